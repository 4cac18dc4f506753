"""`DrMADModel`: a Keras model that trains by momentum SGD and can return
the hypergradient of its last training run."""

import dataclasses
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from drmad_keras import checks
from drmad_keras import options
from drmad_keras import reverse
from drmad_keras.optimizers import MomentumSGD
from drmad_keras.regularizer import HyperRegularizer


@dataclasses.dataclass
class Run:
    """What a `fit` keeps for the meta-backward: constant in `T` unless a
    trajectory was asked for.

    Attributes:
        theta_0: list of tensors. Parameters at the start of the run.
        theta_T: list of tensors. Parameters at the end.
        log_l2: list of tensors. The hyperparameters the run trained with.
        x: tensor. ESet inputs (a reference, not a copy).
        y: tensor. ESet labels.
        batch_size: int.
        steps: int. `T`.
        seed: int. Regenerates the batch order.
        alpha: float, or array `(blocks, num_variables)` when step sizes
            are tuned (see `reverse.schedule_table`).
        gamma: float, or array `(blocks, num_variables)`.
        losses: NumPy array. Training loss of every elementary step.
        trajectory: list of tensors `(T, ...)` or None.
        online: bool. The run changed `log_l2` as it went (`fit_t1t2`).
    """

    theta_0: list
    theta_T: list
    log_l2: list
    x: tf.Tensor
    y: tf.Tensor
    batch_size: int
    steps: int
    seed: int
    alpha: object
    gamma: object
    losses: np.ndarray
    trajectory: list = None
    online: bool = False

    def batch_order(self):
        """The run's batch order (a `reverse.BatchOrder`), regenerated."""
        return reverse.BatchOrder(
            len(self.x), self.batch_size, self.steps, self.seed
        )

    def held_bytes(self):
        """Bytes of parameter copies this record holds (not the data)."""
        tensors = self.theta_0 + self.theta_T + (self.trajectory or [])
        return sum(int(np.prod(t.shape)) * t.dtype.size for t in tensors)


@dataclasses.dataclass
class Hypergradient:
    """The result of `DrMADModel.hypergradient`.

    Attributes:
        grads: dict from hyperparameter name to a NumPy array, the
            derivative of the HSet loss with respect to that hyperparameter
            (`log_l2_<layer>`, and `log_lr_<layer>` and so on for the other
            kinds the model was compiled to tune).
        hset_loss: float. The HSet loss at `theta_T`.
        method: str.
        curvature: str.
        reverse_steps: int.
        growth: float. Largest norm ratio of the reverse pass's `d_theta`.
    """

    grads: dict
    hset_loss: float
    method: str
    curvature: str
    reverse_steps: int
    growth: float


@dataclasses.dataclass
class OnlineRun:
    """The result of `DrMADModel.fit_t1t2`.

    Attributes:
        hset_losses: NumPy array. HSet batch loss before each meta step.
        history: dict from hyperparameter name to an array with its value
            after each meta step (first axis: meta step).
        grads: dict from hyperparameter name to an array with the one-step
            hypergradient of each meta step.
    """

    hset_losses: np.ndarray
    history: dict
    grads: dict


# Median cosine of drmad's hypergradient with exact's, per kind, over the
# 15 settings of benchmarks/accuracy.py (benchmarks/RESULTS.md).
_DRMAD_MEDIAN_COSINE = {
    "log_lr": 0.74,
    "logit_momentum": 0.33,
    "log_init_scale": 0.19,
}


# What a value outside `options.LIMITS` breaks, by kind.
_SATURATES = {
    "log_lr": "step size exp(log_lr) (to 0 or overflow)",
    "logit_momentum": "momentum (to 0 or 1)",
    "log_init_scale": "initial scale (to 0 or overflow)",
}


def _mean_loss(loss):
    """The mean of `loss` over a batch, as a plain function.

    A `keras.losses.Loss` object is called through its `call`, which gives
    per-example values: its own reduction would also divide by the number
    of replicas inside a `tf.distribute` replica context, and the passes
    average replicas themselves.
    """
    if isinstance(loss, keras.losses.Loss):
        fn = loss.call
    else:
        fn = keras.losses.get(loss)
    if fn is None:
        raise ValueError(
            "DrMADModel.compile needs a loss, for example "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True)."
        )

    def data_loss(y, z):
        return keras.ops.cast(keras.ops.mean(fn(y, z)), z.dtype)

    return data_loss


class _Progress:
    """A Keras progress bar over one pass, or nothing when quiet."""

    def __init__(self, total, title, verbose):
        self.bar = None
        if verbose == 1:
            print(title)
            self.bar = keras.utils.Progbar(total, verbose=verbose)

    def __call__(self, done):
        if self.bar is not None:
            self.bar.update(done)


def resolve_verbose(verbose):
    """Maps Keras' `"auto"` to 1 (progress bars) on a terminal, else 2.

    As in Keras, 0 is silent, 1 shows progress bars and 2 one line per
    episode (or nothing, for a single `fit`).
    """
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 'auto', 0, 1 or 2; got {verbose!r}.")
    return int(verbose)


@keras.saving.register_keras_serializable(package="drmad_keras")
class DrMADModel(keras.Model):
    """A `keras.Model` whose training run can be differentiated.

    Use it as a functional model (`DrMADModel(inputs, outputs)`) or subclass
    it. Wrap each layer whose L2 strength is to be tuned in a
    `HyperRegularizer`, compile with a `MomentumSGD`, then:

        model.fit(x_eset, y_eset, batch_size=50, steps=1000, seed=0)
        result = model.hypergradient(x_hset, y_hset)
        result.grads  # {"log_l2_dense": array(...), ...}

    `fit` runs all elementary steps inside compiled loops and keeps only
    `theta_0`, `theta_T` and the seed of the batch order (`last_run`).
    `train_step` makes one elementary step with the same dynamics, so that
    `train_on_batch` and Keras' own `fit` loop agree with it.

    The model must be stateless apart from its weights: layers with
    non-trainable state (batch-normalization statistics, dropout seeds) are
    not supported.
    """

    last_run = None

    def __new__(cls, *args, **kwargs):
        # Functional use gets a class of its own that already derives from
        # Keras' Functional, so that Keras never rewrites DrMADModel's bases
        # and subclassing DrMADModel keeps working in the same process.
        if cls is DrMADModel and (
            len(args) >= 2
            or ("inputs" in kwargs and "outputs" in kwargs)
            or (len(args) == 1 and "outputs" in kwargs)
        ):
            cls = FunctionalDrMADModel
        return super().__new__(cls, *args, **kwargs)

    _data_loss = None
    _xla = False
    _tune = ("log_l2",)
    _schedule_blocks = 1

    def compile(
        self,
        optimizer=None,
        loss=None,
        metrics=None,
        jit_compile=False,
        tune=("log_l2",),
        schedule_blocks=1,
        **kwargs,
    ):
        """Configures the model for DrMAD training.

        Args:
            optimizer: `MomentumSGD`. Gives `alpha` and `gamma`.
            loss: str or `keras.losses.Loss`. The data loss, mean over the
                batch. For `curvature="gauss_newton"` it must be convex in
                the outputs: use logits and `from_logits=True`.
            metrics: Passed to `keras.Model.compile`.
            jit_compile: bool, default False. Compile the elementary steps
                and the reverse pass with XLA.
            tune: sequence of str, default `("log_l2",)`. The kinds of
                hyperparameter to tune, each one per `HyperRegularizer`
                layer: `"log_l2"` (L2 strength), `"log_lr"` (log of the
                step size `alpha` of the layer's weights), `"logit_momentum"`
                (logit of its momentum `gamma`) and `"log_init_scale"` (log
                of a factor on the layer's kernel at the start of each
                `fit`). Layers without a `HyperRegularizer` keep the
                optimizer's `alpha` and `gamma`.
            schedule_blocks: int, default 1. `log_lr` and `logit_momentum`
                hold one value per block of this many equal stretches of
                the run: a step-size and momentum schedule. Compiling
                again resets these kinds to their starting values.
            **kwargs: Passed to `keras.Model.compile`.

        Raises:
            TypeError: If `optimizer` is not a `MomentumSGD`.
            ValueError: If `loss` is missing, or for an unknown kind.
        """
        if not isinstance(optimizer, MomentumSGD):
            raise TypeError(
                "DrMADModel.compile needs optimizer=drmad_keras.MomentumSGD("
                f"alpha, gamma); got {type(optimizer).__name__}."
            )
        if isinstance(tune, str):
            tune = (tune,)
        if not isinstance(tune, (tuple, list)):
            raise ValueError(
                f"tune must be a sequence of kinds among {options.KINDS}; got "
                f"{tune!r}."
            )
        tune = tuple(tune)
        for kind in tune:
            checks.one_of("tune", kind, options.KINDS)
        if not tune or len(set(tune)) != len(tune):
            raise ValueError(
                f"tune must name each kind once, at least one of "
                f"{options.KINDS}; got {tune}."
            )
        schedule_blocks = checks.positive_int(
            "schedule_blocks", schedule_blocks
        )
        if schedule_blocks > 1 and not set(tune) & set(options.OPTIMIZER_KINDS):
            raise ValueError(
                "schedule_blocks gives log_lr and logit_momentum one value "
                f"per block; tune {tune} has neither."
            )
        if "logit_momentum" in tune and optimizer.gamma == 0.0:
            raise ValueError(
                "tuning logit_momentum needs a momentum gamma above 0 to "
                "start from; the optimizer has gamma=0."
            )
        self._tune = tuple(k for k in options.KINDS if k in tune)
        self._schedule_blocks = schedule_blocks
        self._hyper_values = {}
        self._data_loss = _mean_loss(loss)
        super().compile(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            jit_compile=jit_compile,
            **kwargs,
        )
        self._xla = jit_compile is True

    def get_compile_config(self):
        """Keras' compile config plus `tune` and `schedule_blocks`."""
        config = super().get_compile_config()
        if config is not None:
            config["tune"] = list(self._tune)
            config["schedule_blocks"] = self._schedule_blocks
        return config

    def compile_from_config(self, config):
        """Compiles from `get_compile_config()`, as `load_model` does."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # Structure ---------------------------------------------------------------

    @property
    def hyper_regularizers(self):
        """list of `HyperRegularizer`: every one in the model, in order."""
        return [
            layer
            for layer in self._flatten_layers(include_self=False)
            if isinstance(layer, HyperRegularizer)
        ]

    @property
    def tuned_kinds(self):
        """tuple of str: the kinds of hyperparameter `compile` asked for."""
        return self._tune

    @property
    def schedule_blocks(self):
        """int: blocks of the step-size and momentum schedule."""
        return self._schedule_blocks

    @property
    def hyperparameter_names(self):
        """list of str: the names of the tuned hyperparameters, kind by
        kind (`log_l2_<layer>`, then `log_lr_<layer>`, ...)."""
        return [
            f"{kind}_{reg.layer.name}"
            for kind in self._tune
            for reg in self.hyper_regularizers
        ]

    def get_log_l2(self):
        """Returns a dict from hyperparameter name to its `log_l2` array."""
        return {
            reg.hp_name: np.array(reg.log_l2.numpy())
            for reg in self.hyper_regularizers
        }

    def _default_value(self, kind):
        blocks = self._schedule_blocks
        if kind == "log_lr":
            return np.full(blocks, np.log(self.optimizer.alpha))
        if kind == "logit_momentum":
            gamma = self.optimizer.gamma
            return np.full(blocks, np.log(gamma / (1.0 - gamma)))
        return np.zeros(())

    def get_hyperparameters(self):
        """Returns a dict from name to value of every tuned hyperparameter.

        `log_l2_<layer>` as `get_log_l2`; `log_lr_<layer>` and
        `logit_momentum_<layer>` have one value per schedule block (they
        start at the optimizer's `alpha` and `gamma`), `log_init_scale_`
        `<layer>` is one number (starts at 0: the kernel as initialized).
        """
        values = {}
        for kind in self._tune:
            if kind == "log_l2":
                values.update(self.get_log_l2())
                continue
            for reg in self.hyper_regularizers:
                name = f"{kind}_{reg.layer.name}"
                values[name] = np.array(
                    self._hyper_values.get(name, self._default_value(kind))
                )
        return values

    def set_hyperparameters(self, values):
        """Sets tuned hyperparameters from a dict of name to value.

        Every entry is checked before any is set: a bad one changes
        nothing.

        Raises:
            KeyError: For a name the model does not tune.
            ValueError: For a value of the wrong shape, not finite, or (for
                the step size, momentum and initial scale) outside
                `options.LIMITS`, where its transform saturates.
        """
        checked = self._checked(values, self.hyperparameter_names)
        for name, value in checked.items():
            if options.kind_of(name) == "log_l2":
                self._log_l2_variable(name).assign(value)
            else:
                self._hyper_values[name] = value

    def set_log_l2(self, values):
        """Sets `log_l2` from a dict of hyperparameter name to value.

        Raises:
            KeyError: For a name the model does not have.
            ValueError: For a value of the wrong shape or not finite.
        """
        names = [reg.hp_name for reg in self.hyper_regularizers]
        for name, value in self._checked(values, names).items():
            self._log_l2_variable(name).assign(value)

    def _log_l2_variable(self, name):
        for reg in self.hyper_regularizers:
            if reg.hp_name == name:
                return reg.log_l2
        raise KeyError(name)

    def _checked(self, values, names):
        """`values` converted to arrays of the right shape and dtype, every
        one checked; raises naming the first bad entry."""
        if not isinstance(values, dict):
            raise TypeError(
                "hyperparameters are set from a dict of name to value; got "
                f"{type(values).__name__}."
            )
        checked = {}
        for name, value in values.items():
            if name not in names:
                raise KeyError(
                    f"no hyperparameter {name!r}; the model tunes "
                    f"{sorted(names)}."
                )
            kind = options.kind_of(name)
            if kind == "log_l2":
                var = self._log_l2_variable(name)
                shape, dtype = tuple(var.shape), var.dtype
            else:
                shape, dtype = self._default_value(kind).shape, "float64"
            if isinstance(value, (str, bytes, bool)):
                value = None  # refused below, like any non-number
            try:
                value = np.broadcast_to(
                    np.asarray(value, dtype=np.float64), shape
                ).astype(dtype)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name} takes a number or an array of shape {shape}; "
                    f"got {value!r}."
                ) from None
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be finite; got {value}.")
            low, high = options.LIMITS.get(kind, (-np.inf, np.inf))
            if np.any(value < low) or np.any(value > high):
                raise ValueError(
                    f"{name} must lie in [{low:g}, {high:g}]: beyond, the "
                    f"{_SATURATES[kind]} saturates in float32; got {value}."
                )
            checked[name] = value
        return checked

    def _layer_positions(self):
        """For each `HyperRegularizer`: the positions of its layer's
        variables in `trainable_variables`, and of its kernel."""
        positions = {id(v): i for i, v in enumerate(self.trainable_variables)}
        return [
            (
                [positions[id(v)] for v in reg.layer.trainable_variables],
                positions[id(reg.kernel)],
            )
            for reg in self.hyper_regularizers
        ]

    def _schedules(self):
        """`(alpha, gamma)` of a run: floats, or `(blocks, variables)`
        tables when step sizes or momenta are tuned."""
        alpha, gamma = self.optimizer.alpha, self.optimizer.gamma
        if not set(self._tune) & set(options.OPTIMIZER_KINDS):
            return alpha, gamma
        shape = (self._schedule_blocks, len(self.trainable_variables))
        alpha, gamma = np.full(shape, alpha), np.full(shape, gamma)
        values = self.get_hyperparameters()
        for reg, (where, _) in zip(
            self.hyper_regularizers, self._layer_positions()
        ):
            name = reg.layer.name
            if "log_lr" in self._tune:
                alpha[:, where] = np.exp(values[f"log_lr_{name}"])[:, None]
            if "logit_momentum" in self._tune:
                logit = values[f"logit_momentum_{name}"]
                gamma[:, where] = (1.0 / (1.0 + np.exp(-logit)))[:, None]
        return alpha, gamma

    def check_hyper_regularizers(self):
        """Returns the `HyperRegularizer`s, or raises if there are none or
        two share a hyperparameter name."""
        regs = self.hyper_regularizers
        if not regs:
            raise ValueError(
                "DrMADModel has no HyperRegularizer layer, so there is no "
                "hyperparameter to differentiate; wrap at least one layer "
                "with a kernel in drmad_keras.HyperRegularizer."
            )
        names = [reg.hp_name for reg in regs]
        if len(set(names)) != len(names):
            raise ValueError(
                "two HyperRegularizers wrap layers of the same name "
                f"({names}); give every wrapped layer a unique name."
            )
        return regs

    def _check_ready(self):
        if getattr(self, "_data_loss", None) is None:
            raise ValueError(
                "compile the model with drmad_keras.MomentumSGD and a loss "
                "before fit()."
            )
        regs = self.check_hyper_regularizers()
        hyper_ids = {id(reg.log_l2) for reg in regs}
        others = [
            v.path
            for v in self.non_trainable_variables
            if id(v) not in hyper_ids
        ]
        if others:
            raise NotImplementedError(
                "DrMADModel supports models whose only state is their "
                "weights; these non-trainable variables are not supported: "
                f"{others}."
            )

    def objective(self):
        """The `Objective` of this model for the functional passes.

        Built once per compile and reused, so that the compiled loops of
        `reverse` are traced once per model, not once per call.
        """
        cached = getattr(self, "_objective", None)
        if cached is not None and cached.data_loss_fn is self._data_loss:
            return cached
        regs = self.hyper_regularizers
        positions = {id(v): i for i, v in enumerate(self.trainable_variables)}
        kernel_at = [positions[id(reg.kernel)] for reg in regs]
        non_trainable = list(self.non_trainable_variables)

        def output_fn(theta, x):
            outputs, _ = self.stateless_call(theta, non_trainable, x)
            return outputs

        def penalty_fn(theta, log_l2):
            return tf.add_n(
                [
                    reg.penalty(theta[k], lam)
                    for reg, k, lam in zip(regs, kernel_at, log_l2)
                ]
            )

        strategy = self.distribute_strategy
        if not tf.distribute.has_strategy() and (
            strategy is tf.distribute.get_strategy()
        ):
            strategy = None
        self._objective = reverse.Objective(
            output_fn, self._data_loss, penalty_fn, strategy
        )
        return self._objective

    # Meta-forward ------------------------------------------------------------

    def train_step(self, data):
        """One elementary step on one batch, through the optimizer."""
        x, y = data[0], data[1]
        regs = self.hyper_regularizers
        theta = [v.value for v in self.trainable_variables]
        log_l2 = [reg.log_l2.value for reg in regs]
        loss, grads = reverse.gradient(self.objective(), theta, log_l2, x, y)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        steps=None,
        seed=0,
        record_trajectory=False,
        **kwargs,
    ):
        """Trains by `T` elementary steps and records the run.

        When the model tunes `log_init_scale`, each wrapped kernel is
        multiplied by its `exp(log_init_scale)` as the run starts: start
        every run from the unscaled initial weights (`DrMADTuner` does).

        Args:
            x: array. ESet inputs, held in memory.
            y: array. ESet labels.
            batch_size: int, default 32. Examples per elementary step.
            epochs: int, default 1. Passes over ESet when `steps` is None.
            verbose: `"auto"`, 0 or 1. Progress bar.
            callbacks: list of `keras.callbacks.Callback`. Get `on_train_begin`
                (before `theta_0` and the settings are read) and
                `on_train_end`; the steps run in compiled chunks.
            steps: int or None. `T`; by default `epochs` passes.
            seed: int, default 0. Seed of the batch order.
            record_trajectory: bool, default False. Keep every `theta_t`
                for `hypergradient(method="exact")`; memory grows with `T`.
            **kwargs: Not supported; named in the error.

        Returns:
            A `keras.callbacks.History` with the mean training loss of
            each chunk of steps under `"loss"`.

        Raises:
            TypeError: For unsupported arguments.
            ValueError: For bad sizes or data.
            reverse.DivergenceError: If training diverges; `last_run` is
                then None and the weights are left at `theta_0`.
        """
        if kwargs:
            raise TypeError(
                "DrMADModel.fit trains on arrays in memory and does not "
                f"take {sorted(kwargs)}."
            )
        x, y, batch_size, steps = self._check_run(
            x, y, batch_size, epochs, steps, seed
        )
        verbose = resolve_verbose(verbose)

        # Callbacks first: they may still change weights or settings.
        history = keras.callbacks.History()
        cbs = keras.callbacks.CallbackList(
            callbacks, add_history=False, model=self
        )
        history.set_model(self)
        cbs.on_train_begin()
        self.last_run = None

        regs = self.hyper_regularizers
        log_l2 = [tf.convert_to_tensor(reg.log_l2.value) for reg in regs]
        theta_0 = [tf.identity(v.value) for v in self.trainable_variables]
        if "log_init_scale" in self._tune:
            values = self.get_hyperparameters()
            for reg, (_, k) in zip(regs, self._layer_positions()):
                scale = np.exp(values[f"log_init_scale_{reg.layer.name}"])
                theta_0[k] = theta_0[k] * tf.cast(scale, theta_0[k].dtype)
        index = reverse.BatchOrder(len(x), batch_size, steps, seed)
        alpha, gamma = self._schedules()
        theta_T, losses, trajectory = reverse.meta_forward(
            self.objective(),
            theta_0,
            log_l2,
            x,
            y,
            index,
            alpha,
            gamma,
            record_trajectory=record_trajectory,
            jit_compile=self._xla,
            progress=_Progress(steps, "meta-forward", verbose),
        )
        self._record(
            theta_T,
            Run(
                theta_0=theta_0,
                theta_T=theta_T,
                log_l2=log_l2,
                x=x,
                y=y,
                batch_size=batch_size,
                steps=steps,
                seed=seed,
                alpha=alpha,
                gamma=gamma,
                losses=losses,
                trajectory=trajectory,
            ),
        )
        chunk = reverse.CHUNK_STEPS
        history.history["loss"] = [
            float(np.mean(losses[i : i + chunk]))
            for i in range(0, steps, chunk)
        ]
        cbs.on_train_end({"loss": float(losses[-1])})
        return history

    def fit_t1t2(
        self,
        x,
        y,
        x_hyper,
        y_hyper,
        meta_step,
        batch_size=None,
        epochs=1,
        steps=None,
        interval=10,
        seed=0,
        verbose="auto",
    ):
        """Trains once and tunes `log_l2` during the run (T1-T2).

        Every `interval` elementary steps on ESet, the one-step
        hypergradient of the HSet loss (`reverse.one_step_hypergradient`,
        on the next HSet batch of `batch_size`) goes to `meta_step`, and the
        following steps train with the values it returns. The model ends
        with the run's final weights and `log_l2`; `last_run` records the
        run (its `log_l2` are the final values, not those it trained with
        throughout, so `hypergradient()` is refused after it).

        Args:
            x: array. ESet inputs.
            y: array. ESet labels.
            x_hyper: array. HSet inputs.
            y_hyper: array. HSet labels.
            meta_step: callable. `(values, grads) -> new values`, dicts from
                hyperparameter name to NumPy array.
            batch_size: int, default 32. Examples per elementary step and
                per HSet batch.
            epochs: int, default 1. Passes over ESet when `steps` is None.
            steps: int or None. Elementary steps `T`.
            interval: int, default 10. Elementary steps per meta step.
            seed: int, default 0. Seed of the ESet and HSet batch orders.
            verbose: `"auto"`, 0 or 1. Progress bar.

        Returns:
            An `OnlineRun`.

        Raises:
            NotImplementedError: If the model tunes more than `log_l2`.
            ValueError: For bad sizes or data.
            reverse.DivergenceError: If training or a hypergradient stops
                being finite; the weights are then left at the start and
                `log_l2` at its starting values.
        """
        if self._tune != ("log_l2",):
            raise NotImplementedError(
                "fit_t1t2 tunes log_l2 only; the model is compiled to tune "
                f"{self._tune}. Compile with tune=('log_l2',) or use "
                "fit() and hypergradient()."
            )
        x, y, batch_size, steps = self._check_run(
            x, y, batch_size, epochs, steps, seed
        )
        x_hyper, y_hyper = self._as_tensors(x_hyper, y_hyper)
        if batch_size > len(x_hyper):
            raise ValueError(
                f"batch_size {batch_size} is larger than the "
                f"{len(x_hyper)} HSet examples."
            )
        interval = checks.positive_int("interval", interval)
        verbose = resolve_verbose(verbose)
        self.last_run = None

        regs = self.hyper_regularizers
        names = [reg.hp_name for reg in regs]
        theta_0 = [tf.identity(v.value) for v in self.trainable_variables]
        meta_steps = -(-steps // interval)
        history = {name: [] for name in names}

        def step(values, grads):
            new = meta_step(dict(zip(names, values)), dict(zip(names, grads)))
            if not isinstance(new, dict) or set(new) != set(names):
                raise ValueError(
                    "meta_step must return a dict with exactly the names "
                    f"{names}; got "
                    f"{sorted(new) if isinstance(new, dict) else new!r}."
                )
            try:
                new = self._checked(new, names)
            except ValueError as error:
                raise ValueError(f"meta_step returned a bad value: {error}")
            for name in names:
                history[name].append(new[name])
            return [new[name] for name in names]

        alpha, gamma = self.optimizer.alpha, self.optimizer.gamma
        theta_T, log_l2, losses, hset_losses, grads = reverse.t1t2_run(
            self.objective(),
            theta_0,
            [tf.convert_to_tensor(reg.log_l2.value) for reg in regs],
            x,
            y,
            reverse.BatchOrder(len(x), batch_size, steps, seed),
            alpha,
            gamma,
            x_hyper,
            y_hyper,
            reverse.BatchOrder(len(x_hyper), batch_size, meta_steps, seed + 1),
            interval,
            step,
            jit_compile=self._xla,
            progress=_Progress(steps, "meta-forward (t1t2)", verbose),
        )
        self.set_log_l2({name: lam.numpy() for name, lam in zip(names, log_l2)})
        self._record(
            theta_T,
            Run(
                theta_0=theta_0,
                theta_T=theta_T,
                log_l2=log_l2,
                x=x,
                y=y,
                batch_size=batch_size,
                steps=steps,
                seed=seed,
                alpha=alpha,
                gamma=gamma,
                losses=losses,
                online=True,
            ),
        )
        return OnlineRun(
            hset_losses=np.asarray(hset_losses),
            history={k: np.stack(v) for k, v in history.items()},
            grads={
                name: np.stack([g[i] for g in grads])
                for i, name in enumerate(names)
            },
        )

    def _record(self, theta_T, run):
        """Ends a run: the weights become `theta_T`, `last_run` its record."""
        for var, value in zip(self.trainable_variables, theta_T):
            var.assign(value)
        self.last_run = run

    def check_run_settings(self, steps, reverse_steps=None):
        """Refuses run lengths the tuned hyperparameters cannot work with.

        Args:
            steps: int. Elementary steps `T` of a run.
            reverse_steps: int or None. Reverse steps of its hypergradient.

        Raises:
            ValueError: For fewer steps than schedule blocks, more reverse
                steps than steps, or a partial reverse pass while
                `log_init_scale` is tuned.
        """
        if steps < self._schedule_blocks:
            raise ValueError(
                f"a schedule of {self._schedule_blocks} blocks needs at least "
                f"as many elementary steps; got steps={steps}."
            )
        if reverse_steps is None:
            return
        if reverse_steps > steps:
            raise ValueError(
                f"reverse_steps ({reverse_steps}) cannot exceed the {steps} "
                "elementary steps of the run."
            )
        if "log_init_scale" in self._tune and reverse_steps < steps:
            raise ValueError(
                "the log_init_scale hypergradient needs the whole reverse "
                f"pass; got reverse_steps={reverse_steps} of {steps}."
            )

    def _check_run(self, x, y, batch_size, epochs, steps, seed):
        """Checks the arguments of a training run; returns `(x, y,
        batch_size, steps)`."""
        x, y = self._as_tensors(x, y)
        batch_size = checks.positive_int(
            "batch_size", 32 if batch_size is None else batch_size
        )
        if batch_size > len(x):
            raise ValueError(
                f"batch_size {batch_size} is larger than the "
                f"{len(x)} training examples."
            )
        if steps is None:
            steps = checks.positive_int("epochs", epochs) * (
                len(x) // batch_size
            )
        steps = checks.positive_int("steps", steps)
        self.check_run_settings(steps)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(
                "seed must be an integer: the reverse pass regenerates the "
                f"batch order from it; got {seed!r}."
            )
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be non-negative; got {seed}.")
        self._check_ready()
        strategy = self.objective().strategy
        if strategy is not None and batch_size % strategy.num_replicas_in_sync:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the "
                f"{strategy.num_replicas_in_sync} replicas of the "
                "distribution strategy."
            )
        return x, y, batch_size, steps

    def _as_tensors(self, x, y):
        """Converts and checks one split: sizes, values, shapes, labels."""
        if x is None or y is None:
            raise ValueError("fit and hypergradient need both x and y.")
        try:
            x = tf.convert_to_tensor(np.asarray(x), dtype=self.compute_dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(f"x must be an array of numbers: {error}") from None
        y = tf.convert_to_tensor(np.asarray(y))
        if x.shape.rank == 0 or len(x) != len(y):
            raise ValueError(
                f"x and y must hold the same number of examples; got shapes "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        if len(x) == 0:
            raise ValueError("x is empty.")
        if not bool(tf.reduce_all(tf.math.is_finite(x))):
            raise ValueError("x holds non-finite values (NaN or inf).")

        # One example through the model: does the shape fit?
        try:
            outputs = self(x[:1])
        except Exception as error:  # Keras raises many kinds here.
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} do not fit the model: "
                f"{str(error).splitlines()[0]}"
            ) from None

        # Class ids index the outputs; whole-number floats count as ids.
        if y.dtype.is_floating and y.shape.rank == 1:
            if not bool(tf.reduce_all(tf.equal(y, tf.round(y)))):
                raise ValueError(
                    "labels must be whole class ids (0, 1, ...); got "
                    "fractional or non-finite values."
                )
            y = tf.cast(y, tf.int64)
        elif not (y.dtype.is_integer or y.dtype.is_floating):
            raise TypeError(f"labels must be numbers; got {y.dtype.name}.")
        if y.dtype.is_integer and y.shape.rank == 1:
            classes = outputs.shape[-1]
            low, high = int(tf.reduce_min(y)), int(tf.reduce_max(y))
            if low < 0 or high >= classes:
                raise ValueError(
                    f"labels must be in [0, {classes}) for a model with "
                    f"{classes} outputs; got labels from {low} to {high}."
                )
        return x, y

    # Meta-backward -----------------------------------------------------------

    def hypergradient(
        self,
        x_hyper,
        y_hyper,
        method="drmad",
        curvature=None,
        reverse_steps=None,
        max_growth=1e6,
        verbose="auto",
    ):
        """Derivative of the HSet loss of the last `fit` in every tuned
        hyperparameter.

        Under `drmad` the step-size, momentum and initial-scale
        hypergradients agree with `exact` far less well than those of
        `log_l2` (the step-size and momentum ones rest on the straight
        line's mean velocity, see `reverse`); a warning says so.
        `log_init_scale` needs the whole reverse pass (`reverse_steps`
        None).

        Args:
            x_hyper: array. HSet inputs.
            y_hyper: array. HSet labels.
            method: str, default `"drmad"`. `"drmad"` (straight line, memory
                constant in `T`) or `"exact"` (stored trajectory; needs
                `fit(..., record_trajectory=True)`).
            curvature: str or None. `"gauss_newton"` (the default for
                `drmad`) or `"hessian"` (the default for `exact`).
            reverse_steps: int or None. Walk back over only the last this
                many steps of the run; None means all of them.
            max_growth: float, default 1e6. See `reverse.meta_backward`.
            verbose: `"auto"`, 0 or 1. Progress bar.

        Returns:
            A `Hypergradient`.

        Raises:
            ValueError: Before any `fit`, or for bad arguments.
            reverse.DivergenceError: If the reverse pass diverges.
        """
        run = self.last_run
        if run is None:
            raise ValueError(
                "hypergradient() needs a finished fit() of this model to "
                "differentiate; call fit() first."
            )
        if run.online:
            raise ValueError(
                "the last run was fit_t1t2, which changed log_l2 during the "
                "run; hypergradient() differentiates a fit() run."
            )
        checks.one_of("method", method, reverse.METHODS)
        if curvature is None:
            curvature = "gauss_newton" if method == "drmad" else "hessian"
        checks.one_of("curvature", curvature, reverse.CURVATURES)
        if reverse_steps is not None:
            reverse_steps = checks.positive_int("reverse_steps", reverse_steps)
        if not isinstance(max_growth, (int, float)) or not max_growth > 1:
            raise ValueError(
                f"max_growth must be a number above 1 (inf turns the check "
                f"off); got {max_growth!r}."
            )
        total = reverse_steps or run.steps
        self.check_run_settings(run.steps, total)
        optimizer_terms = bool(set(self._tune) & set(options.OPTIMIZER_KINDS))
        unreliable = [k for k in self._tune if k in _DRMAD_MEDIAN_COSINE]
        if unreliable and method == "drmad":
            figures = ", ".join(
                f"{k} {_DRMAD_MEDIAN_COSINE[k]}" for k in unreliable
            )
            warnings.warn(
                "method='drmad' estimates these hypergradients poorly: "
                f"median cosine with 'exact' over the benchmark settings: "
                f"{figures} (log_l2 0.99; benchmarks/RESULTS.md). Prefer "
                "method='exact' for these kinds where memory allows.",
                stacklevel=2,
            )
        x_hyper, y_hyper = self._as_tensors(x_hyper, y_hyper)
        verbose = resolve_verbose(verbose)

        objective = self.objective()
        hset_loss, d_theta = reverse.hset_gradient(
            objective, run.theta_T, x_hyper, y_hyper
        )
        if not np.isfinite(float(hset_loss)):
            raise reverse.DivergenceError(
                f"the HSet loss at theta_T is {float(hset_loss)}.",
                phase="meta-backward",
            )
        backward = reverse.meta_backward(
            objective,
            run.theta_0,
            run.theta_T,
            run.log_l2,
            run.x,
            run.y,
            run.batch_order(),
            run.alpha,
            run.gamma,
            d_theta,
            method=method,
            curvature=curvature,
            reverse_steps=reverse_steps,
            trajectory=run.trajectory,
            max_growth=max_growth,
            jit_compile=self._xla,
            progress=_Progress(total, "meta-backward", verbose),
            optimizer_terms=optimizer_terms,
        )
        return Hypergradient(
            grads=self._by_name(run, backward),
            hset_loss=float(hset_loss),
            method=method,
            curvature=curvature,
            reverse_steps=total,
            growth=backward.growth,
        )

    def _by_name(self, run, backward):
        """The reverse pass's derivatives, in each tuned hyperparameter.

        Per layer, the step-size derivative sums the layer's variables'
        `alpha * d_alpha` (chain rule for the log), the momentum one their
        `gamma (1 - gamma) d_gamma` (for the logit), and the initial-scale
        one the kernel's `d_theta_0 . theta_0`.
        """
        grads = {}
        regs = self.hyper_regularizers
        for kind in self._tune:
            for i, (reg, (where, k)) in enumerate(
                zip(regs, self._layer_positions())
            ):
                name = f"{kind}_{reg.layer.name}"
                if kind == "log_l2":
                    grads[name] = backward.d_log_l2[i]
                elif kind == "log_lr":
                    grads[name] = np.sum(
                        (run.alpha * backward.d_alpha)[:, where], axis=1
                    )
                elif kind == "logit_momentum":
                    gamma = run.gamma
                    grads[name] = np.sum(
                        (gamma * (1.0 - gamma) * backward.d_gamma)[:, where],
                        axis=1,
                    )
                else:
                    grads[name] = np.asarray(
                        np.sum(backward.d_theta_0[k] * run.theta_0[k].numpy())
                    )
        return grads

    def evaluate_split(self, x, y):
        """Returns `(mean loss, error rate)` of the data loss on a split."""
        x, y = self._as_tensors(x, y)
        outputs = self(x)
        loss = float(self._data_loss(y, outputs))
        predicted = np.argmax(np.asarray(outputs), axis=-1)
        error = float(np.mean(predicted != np.asarray(y).reshape(-1)))
        return loss, error


@keras.saving.register_keras_serializable(package="drmad_keras")
class FunctionalDrMADModel(DrMADModel, Functional):
    """What `DrMADModel(inputs, outputs)` builds: a functional DrMADModel."""
