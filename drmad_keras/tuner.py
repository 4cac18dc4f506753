"""`DrMADTuner` and its oracle: one keras-tuner trial is one episode.

An episode trains a model with fixed hyperparameters on ESet
(meta-forward), takes the hypergradient of the HSet loss (meta-backward),
makes one meta step on the hyperparameters, and reports VSet metrics as the
objective. The next trial starts from the values that the last finished
trial ended with, so the trials form a chain. The hyperparameters are the
model's `log_l2`, and its step sizes, momenta and initial scales when it was
compiled to tune them (`DrMADModel.compile(tune=...)`).

With `method="t1t2"` an episode is instead one training run in which
`log_l2` takes a meta step every few elementary steps (`fit_t1t2`); the
next episode starts a new run from the values this one ended with.

Defaults, as DESIGN.md asks them stated: `theta_0` is the same in every
episode (the model is built from the same seed; `redraw_init=True` changes
the seed each episode), and the ESet batch order is the same in every
episode (`reshuffle=True` changes it).
"""

import copy
import inspect
import json
import os
import random
import time
import warnings

import keras
import keras_tuner
import numpy as np
from absl import logging

from drmad_keras import checks
from drmad_keras import options
from drmad_keras import reverse
from drmad_keras.model import DrMADModel
from drmad_keras.model import resolve_verbose

META_OPTIMIZERS = options.META_OPTIMIZERS
NEXT_PREFIX = "next_"
# The hyperparameter naming a trial's chain, when there are several.
CHAIN = "chain"
EPISODE_FILE = "episode.npz"


def _atomic_write(path, write):
    """Calls `write(tmp_path)`, then moves the file into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_state_atomically(stateful, fname):
    """`Stateful.save`, but written to a temporary file and moved into
    place, so that a process killed mid-write leaves the old file whole."""
    os.makedirs(os.path.dirname(fname) or ".", exist_ok=True)
    write_json(fname, stateful.get_state())


def save_episode(path, arrays):
    """Saves a dict of named arrays to `path` atomically."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def load_episode(path):
    """Loads what `save_episode` wrote, as a dict of arrays."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


class MetaOptimizer:
    """The meta step: Adam (default) or sign-SGD, then a clip.

    State is a dict of NumPy arrays, so that it can be saved with the
    episode and restored with it. Each value is clipped to the range of its
    kind: `log_l2_range` for `log_l2`, `options.RANGES` for the others.

    Args:
        name: str, default `"adam"`. `"adam"` or `"sign_sgd"`.
        learning_rate: float, default 0.1. Step size in log (or logit)
            space.
        log_l2_range: (float, float), default (-12, 2). Clip range of
            `log_l2`.
        ranges: dict or None. Clip ranges of other kinds, by kind
            (`{"log_lr": (-6, 0)}`); the rest keep `options.RANGES`.
    """

    def __init__(
        self,
        name="adam",
        learning_rate=0.1,
        log_l2_range=(-12.0, 2.0),
        ranges=None,
    ):
        self.name = checks.one_of("meta_optimizer", name, META_OPTIMIZERS)
        self.learning_rate = checks.positive_float(
            "meta_learning_rate", learning_rate
        )
        self.log_l2_range = _range("log_l2_range", log_l2_range)
        self.ranges = dict(options.RANGES, log_l2=self.log_l2_range)
        if ranges is not None and not isinstance(ranges, dict):
            raise ValueError(
                f"ranges must be a dict from kind to (low, high); got "
                f"{ranges!r}."
            )
        for kind, pair in (ranges or {}).items():
            checks.one_of("ranges kind", kind, options.KINDS[1:])
            self.ranges[kind] = _range(f"ranges[{kind!r}]", pair)

    def step(self, values, grads, state, scale=1.0):
        """Returns `(new_values, new_state)`; inputs are not modified.

        Args:
            values: dict of name to array. Current `log_l2`.
            grads: dict of name to array. Hypergradient.
            state: dict of name to array. From a previous step, or empty.
            scale: float, default 1.0. Multiplies the learning rate.
        """
        lr = self.learning_rate * scale
        new_values, new_state = {}, {}
        count = float(state.get("count", 0.0)) + 1.0
        new_state["count"] = np.asarray(count)
        for name, value in values.items():
            g = np.asarray(grads[name], dtype=np.float64)
            if self.name == "sign_sgd":
                update = np.sign(g)
            else:
                m = 0.9 * state.get(f"m/{name}", 0.0) + 0.1 * g
                v = 0.999 * state.get(f"v/{name}", 0.0) + 0.001 * g * g
                new_state[f"m/{name}"] = np.asarray(m)
                new_state[f"v/{name}"] = np.asarray(v)
                m_hat = m / (1.0 - 0.9**count)
                v_hat = v / (1.0 - 0.999**count)
                update = m_hat / (np.sqrt(v_hat) + 1e-8)
            new_values[name] = np.clip(
                np.asarray(value, np.float64) - lr * update,
                *self.ranges[options.kind_of(name) or "log_l2"],
            )
        return new_values, new_state


def _range(name, pair):
    """A checked clip range `(low, high)`."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair (low, high); got {pair!r}.")
    low, high = (checks.finite_float(name, v) for v in pair)
    if not low < high:
        raise ValueError(
            f"{name} must be (low, high) with low < high; got {tuple(pair)}."
        )
    return low, high


class DrMADOracle(keras_tuner.Oracle):
    """Chains trials: each starts from the last finished one's result.

    With `chains` > 1 the trials are dealt to the chains in turn, and each
    chain goes on from its own last finished trial; the hyperparameter
    `chain` says which chain a trial belongs to. Chain 0 starts from every
    hyperparameter's default (the `HyperRegularizer`'s `init_log_l2`); chain
    `k` from `initial_values[k]` if given, else from values drawn uniformly
    from each hyperparameter's range with `seed + k`. A later trial of a
    chain takes the values that the chain's last completed trial reported
    as `next_<name>` metrics.

    Args:
        objective: str or `keras_tuner.Objective`, default `"val_error"`.
        max_trials: int, default 10. Number of episodes, all chains
            together; each chain gets an equal share (rounded up).
        chains: int, default 1. Number of independent chains.
        initial_values: list of dict or None. Starting values per chain
            (entries may be None for a drawn start).
        seed: int, default 0. Seed of drawn starts.
        **kwargs: Passed to `keras_tuner.Oracle`.
    """

    def __init__(
        self,
        objective="val_error",
        max_trials=10,
        chains=1,
        initial_values=None,
        seed=0,
        **kwargs,
    ):
        if isinstance(objective, str):
            objective = keras_tuner.Objective(objective, direction="min")
        super().__init__(
            objective=objective, max_trials=max_trials, seed=seed, **kwargs
        )
        self.chains = checks.positive_int("chains", chains)
        self.initial_values = list(initial_values or [])
        if len(self.initial_values) > self.chains:
            raise ValueError(
                f"initial_values has {len(self.initial_values)} entries for "
                f"{self.chains} chain(s)."
            )

    def _chain_start(self, chain):
        """The values chain `chain` starts from."""
        space = [hp for hp in self.hyperparameters.space if hp.name != CHAIN]
        given = (
            self.initial_values[chain]
            if chain < len(self.initial_values)
            else None
        )
        if given is not None:
            unknown = set(given) - {hp.name for hp in space}
            if unknown:
                raise ValueError(
                    f"initial_values[{chain}] names unknown hyperparameters "
                    f"{sorted(unknown)}; they are "
                    f"{sorted(hp.name for hp in space)}."
                )
            return {
                hp.name: float(given.get(hp.name, hp.default)) for hp in space
            }
        if chain == 0:
            return {hp.name: hp.default for hp in space}
        rng = random.Random(self.seed + chain)
        return {
            hp.name: rng.uniform(hp.min_value, hp.max_value) for hp in space
        }

    def save(self):
        _save_state_atomically(self, self._get_oracle_fname())

    def _save_trial(self, trial):
        _save_state_atomically(
            trial,
            os.path.join(self._get_trial_dir(trial.trial_id), "trial.json"),
        )

    def populate_space(self, trial_id):
        # The chain with the fewest trials among those with none running
        # (with several workers, a chain runs one episode at a time) and
        # with trials left of its share of max_trials.
        busy = {chain_of(t) for t in self.ongoing_trials.values()}
        counts = [0] * self.chains
        for trial in self.trials.values():
            counts[chain_of(trial)] += 1
        share = -(-self.max_trials // self.chains)
        free = [
            c for c in range(self.chains) if c not in busy and counts[c] < share
        ]
        if not free:
            return {"status": keras_tuner.engine.trial.TrialStatus.IDLE}
        chain = min(free, key=lambda c: (counts[c], c))

        values = self._chain_start(chain)
        previous = _chain_history(self.get_trial, trial_id, chain)[0]
        if previous is not None:
            for name in values:
                key = NEXT_PREFIX + name
                if previous.metrics.exists(key):
                    values[name] = previous.metrics.get_last_value(key)
        if self.chains > 1:
            values[CHAIN] = chain
        return {
            "status": keras_tuner.engine.trial.TrialStatus.RUNNING,
            "values": values,
        }


def _chain_history(get_trial, trial_id, chain):
    """The chain's last completed trial before `trial_id`, and how many of
    its trials failed since.

    Only `get_trial` is used, so that a worker of a distributed search can
    ask the chief oracle. Trial ids are consecutive numbers.

    Returns:
        `(trial or None, failures)`.
    """
    width = len(trial_id)
    failures = 0
    for number in range(int(trial_id) - 1, -1, -1):
        trial = get_trial(f"{number:0{width}d}")
        if chain_of(trial) != chain:
            continue
        if trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED:
            return trial, failures
        failures += 1
    return None, failures


def chain_of(trial):
    """The chain a trial belongs to (0 when there is one chain)."""
    return int(trial.hyperparameters.values.get(CHAIN, 0))


class _ChainHyperModel(keras_tuner.HyperModel):
    """Builds the user's model and declares its tuned hyperparameters (one
    per `HyperRegularizer` and kind, named after the layer)."""

    def __init__(self, source, ranges, seed, redraw_init, chains):
        super().__init__()
        self.chains = chains
        self.ranges = ranges
        self.seed = seed
        self.redraw_init = redraw_init
        self.episode = 0
        if isinstance(source, DrMADModel):
            if not source.compiled:
                raise ValueError(
                    "compile the DrMADModel (with drmad_keras.MomentumSGD "
                    "and a loss) before handing it to DrMADTuner."
                )
            self._config = keras.saving.serialize_keras_object(source)
            # Deserializing consumes the config: hand it a copy each time.
            self._user_build = lambda hp: keras.saving.deserialize_keras_object(
                copy.deepcopy(self._config)
            )
        elif isinstance(source, keras_tuner.HyperModel):
            self._user_build = source.build
        elif callable(source):
            self._user_build = source
        else:
            raise TypeError(
                "DrMADTuner needs a compiled DrMADModel, a function "
                "build(hp) returning one, or a keras_tuner.HyperModel; got "
                f"{type(source).__name__}."
            )

    def init_seed(self):
        """The seed of this episode's initial weights."""
        return self.seed + (self.episode if self.redraw_init else 0)

    def build(self, hp):
        keras.utils.set_random_seed(self.init_seed())
        model = self._user_build(hp)
        if not isinstance(model, DrMADModel):
            raise TypeError(
                "the model to tune must be a drmad_keras.DrMADModel; the "
                f"build function returned {type(model).__name__}."
            )
        if not model.compiled:
            raise ValueError(
                "the build function must compile the DrMADModel with "
                "drmad_keras.MomentumSGD and a loss."
            )
        model.check_hyper_regularizers()
        if self.chains > 1:
            hp.Int(CHAIN, 0, self.chains - 1)
        for name, value in model.get_hyperparameters().items():
            low, high = self.ranges[options.kind_of(name)]
            if np.any(value < low) or np.any(value > high):
                warnings.warn(
                    f"{name} starts at {np.mean(value):g}, outside its range "
                    f"[{low:g}, {high:g}]; the first episode clips it.",
                    stacklevel=2,
                )
            hp.Float(
                name,
                min_value=low,
                max_value=high,
                default=float(np.clip(np.mean(value), low, high)),
            )
        return model


class DrMADTuner(keras_tuner.Tuner):
    """Tunes the hyperparameters of a `DrMADModel` by hypergradients.

    `search(x, y, hyper_data=(x_h, y_h), validation_data=(x_v, y_v), ...)`
    runs episodes until `max_trials` have run. Everything keras-tuner offers
    works: `results_summary()`, `get_best_hyperparameters()`,
    `get_best_models()`, and a new tuner on the same `directory` and
    `project_name` (with `overwrite=False`) continues the chain.

    For per-unit `log_l2`, and per-block step sizes and momenta, the
    keras-tuner hyperparameter holds the mean of the values; the values
    themselves are in each trial's `episode.npz` (and, for `log_l2`, in the
    weights of its saved model).

    Args:
        hypermodel: a compiled `DrMADModel`, a function `build(hp)` returning
            one (compiled), or a `keras_tuner.HyperModel`.
        max_trials: int, default 10. Number of episodes.
        objective: str, default `"val_error"`. `"val_error"`, `"val_loss"`
            or `"hset_loss"`, minimized.
        method: str, default `"drmad"`. `"drmad"` or `"exact"` (episodes
            of a run and a reverse pass), or `"t1t2"` (episodes of one run
            that tunes `log_l2` online, see `DrMADModel.fit_t1t2`; the
            meta learning rate then applies to each online meta step).
        curvature: str or None. See `DrMADModel.hypergradient`.
        reverse_steps: int or None. See `DrMADModel.hypergradient`.
        meta_optimizer: str, default `"adam"`. `"adam"` or `"sign_sgd"`.
        meta_learning_rate: float, default 0.2.
        log_l2_range: (float, float), default (-12, 2). Clip range of
            `log_l2`.
        ranges: dict or None. Clip ranges of the other kinds, by kind, for
            example `{"log_lr": (-6.0, -1.0)}`; defaults in
            `drmad_keras.options.RANGES`.
        redraw_init: bool, default False. Draw new initial weights each
            episode.
        reshuffle: bool, default False. Draw a new ESet batch order each
            episode.
        seed: int, default 0. Seeds the initial weights and batch order.
        max_growth: float, default 1e6. See `reverse.meta_backward`.
        t1t2_interval: int, default 10. Elementary steps per online meta
            step under `method="t1t2"`.
        chains: int, default 1. Independent chains of episodes, run in
            turn (see `DrMADOracle`); `max_trials` counts all of them.
        initial_values: list of dict or None. Starting `log_l2` per chain;
            chains without an entry start from drawn values (chain 0: the
            defaults).
        **kwargs: Passed to `keras_tuner.Tuner` (`directory`,
            `project_name`, `overwrite`, ...).
    """

    def __init__(
        self,
        hypermodel,
        max_trials=10,
        objective="val_error",
        method="drmad",
        curvature=None,
        reverse_steps=None,
        meta_optimizer="adam",
        meta_learning_rate=0.2,
        log_l2_range=(-12.0, 2.0),
        ranges=None,
        redraw_init=False,
        reshuffle=False,
        seed=0,
        max_growth=1e6,
        t1t2_interval=10,
        chains=1,
        initial_values=None,
        **kwargs,
    ):
        checks.positive_int("max_trials", max_trials)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"seed must be a non-negative integer; got {seed!r}."
            )
        checks.one_of(
            "objective", objective, ("val_error", "val_loss", "hset_loss")
        )
        self.method = checks.one_of("method", method, options.TUNER_METHODS)
        self.t1t2_interval = checks.positive_int("t1t2_interval", t1t2_interval)
        if curvature is not None:
            checks.one_of("curvature", curvature, reverse.CURVATURES)
        self.curvature = curvature
        if reverse_steps is not None:
            reverse_steps = checks.positive_int("reverse_steps", reverse_steps)
        self.reverse_steps = reverse_steps
        self.meta_optimizer = MetaOptimizer(
            meta_optimizer, meta_learning_rate, log_l2_range, ranges
        )
        self.reshuffle = bool(reshuffle)
        self.seed = int(seed)
        self.max_growth = checks.positive_float("max_growth", max_growth)
        oracle = DrMADOracle(
            objective=objective,
            max_trials=max_trials,
            chains=chains,
            initial_values=initial_values,
            seed=self.seed,
        )
        chain = _ChainHyperModel(
            hypermodel,
            self.meta_optimizer.ranges,
            self.seed,
            bool(redraw_init),
            oracle.chains,
        )
        super().__init__(oracle=oracle, hypermodel=chain, **kwargs)

    def search(self, *fit_args, verbose="auto", **fit_kwargs):
        """Runs episodes until `max_trials` trials exist.

        Args:
            *fit_args: `x, y` of ESet, passed to `run_trial`.
            verbose: `"auto"`, 0, 1 or 2. 0 is silent; 2 prints one line
                per episode; 1 adds progress bars and keras-tuner's own
                trial display. `"auto"` is 1 on a terminal, else 2.
            **fit_kwargs: Passed to `run_trial`: `hyper_data`,
                `validation_data`, `batch_size`, `steps`, `epochs`,
                `callbacks`.
        """
        self._verbose = resolve_verbose(verbose)
        self._check_search_args(fit_args, fit_kwargs)
        self.oracle.verbose = 1 if self._verbose == 1 else 0
        super().search(*fit_args, **fit_kwargs)

    def _check_search_args(self, fit_args, fit_kwargs):
        """Refuses bad data and settings before any episode runs."""
        try:
            bound = inspect.signature(self.run_trial).bind(
                None, *fit_args, **fit_kwargs
            )
        except TypeError as error:
            raise TypeError(
                "DrMADTuner.search takes x, y, hyper_data=(x, y), "
                "validation_data=(x, y), batch_size, steps, epochs, "
                f"callbacks and verbose: {error}"
            ) from None
        args = bound.arguments
        for name in ("hyper_data", "validation_data"):
            _pair(name, args[name])
        batch_size = checks.positive_int(
            "batch_size", args.get("batch_size", 50)
        )
        epochs = checks.positive_int("epochs", args.get("epochs", 1))
        if batch_size > len(args["x"]):
            raise ValueError(
                f"batch_size {batch_size} is larger than the "
                f"{len(args['x'])} ESet examples."
            )
        if args.get("steps") is not None:
            steps = checks.positive_int("steps", args["steps"])
        else:
            steps = epochs * (len(args["x"]) // batch_size)
        if self.method == "t1t2" and batch_size > len(args["hyper_data"][0]):
            raise ValueError(
                f"batch_size {batch_size} is larger than the "
                f"{len(args['hyper_data'][0])} HSet examples (t1t2 draws "
                "HSet batches of batch_size)."
            )

        # Every split through a model of the search space.
        model = self.hypermodel.build(self.oracle.get_space())
        if self.method == "t1t2" and model.tuned_kinds != ("log_l2",):
            raise NotImplementedError(
                "method='t1t2' tunes log_l2 only; the model is compiled to "
                f"tune {model.tuned_kinds}. Use method='drmad' or 'exact' "
                "for the other kinds."
            )
        model.check_run_settings(
            steps, None if self.method == "t1t2" else self.reverse_steps
        )
        for name, (x, y) in (
            ("ESet (x, y)", (args["x"], args["y"])),
            ("hyper_data", args["hyper_data"]),
            ("validation_data", args["validation_data"]),
        ):
            try:
                model._as_tensors(x, y)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{name}: {error}") from None

    def pre_create_trial(self):
        # The oracle answers IDLE while every chain has an episode running
        # elsewhere: ask again after a pause, not in a tight loop.
        if getattr(self, "_waiting", False):
            time.sleep(0.5)
        self._waiting = True

    def on_trial_begin(self, trial):
        self._waiting = False
        super().on_trial_begin(trial)

    def _try_run_and_update_trial(self, trial, *fit_args, **fit_kwargs):
        # A diverged episode fails with its reason in one line; other
        # errors keep keras-tuner's handling (the traceback as message).
        try:
            self._run_and_update_trial(trial, *fit_args, **fit_kwargs)
            trial.status = keras_tuner.engine.trial.TrialStatus.COMPLETED
        except reverse.DivergenceError as error:
            trial.status = keras_tuner.engine.trial.TrialStatus.FAILED
            trial.message = f"{error.phase} diverged: {error}"
            logging.warning(
                "episode %s failed: %s", trial.trial_id, trial.message
            )
            if getattr(self, "_verbose", 2):
                print(
                    f"episode {int(trial.trial_id):3d}  failed: {trial.message}"
                )

    # One episode -------------------------------------------------------------

    def run_trial(
        self,
        trial,
        x,
        y,
        hyper_data,
        validation_data,
        batch_size=50,
        steps=None,
        epochs=1,
        callbacks=None,
    ):
        """Runs one episode; returns its metrics for the oracle.

        Args:
            trial: `keras_tuner.engine.trial.Trial`.
            x: array. ESet inputs.
            y: array. ESet labels.
            hyper_data: `(x, y)`. HSet.
            validation_data: `(x, y)`. VSet.
            batch_size: int, default 50.
            steps: int or None. Elementary steps `T`; default `epochs`
                passes over ESet.
            epochs: int, default 1.
            callbacks: list of Keras callbacks, passed to `fit`.

        Returns:
            dict of metrics: `val_error`, `val_loss`, `hset_loss`,
            `train_loss`, `hypergradient_norm`, `seconds`, and a
            `next_<name>` per hyperparameter.
        """
        start = time.time()
        verbose = getattr(self, "_verbose", 2)
        episode = int(trial.trial_id)
        self.hypermodel.episode = episode
        x_h, y_h = _pair("hyper_data", hyper_data)
        x_v, y_v = _pair("validation_data", validation_data)

        # Where this episode starts; the trial records it (per unit: the
        # mean), then the model is built with it.
        values, state, scale = self._episode_start(trial)
        for name, value in values.items():
            trial.hyperparameters.values[name] = float(np.mean(value))
        model = self._episode_model(trial.hyperparameters, x)
        model.set_hyperparameters(values)
        values = model.get_hyperparameters()
        seed = self.seed + (episode if self.reshuffle else 0)

        if self.method == "t1t2":
            # One run with online meta steps; the episode's gradient is the
            # mean of the one-step hypergradients.
            online_state = [state]

            def meta_step(current, grads):
                new, online_state[0] = self.meta_optimizer.step(
                    current, grads, online_state[0], scale=scale
                )
                return new

            online = model.fit_t1t2(
                x,
                y,
                x_h,
                y_h,
                meta_step,
                batch_size=batch_size,
                steps=steps,
                epochs=epochs,
                interval=self.t1t2_interval,
                seed=seed,
                verbose=verbose,
            )
            grads = {k: np.mean(g, axis=0) for k, g in online.grads.items()}
            hset_loss = model.evaluate_split(x_h, y_h)[0]
            next_values, next_state = model.get_log_l2(), online_state[0]
        else:
            # Meta-forward on ESet, meta-backward on HSet, meta step.
            model.fit(
                x,
                y,
                batch_size=batch_size,
                steps=steps,
                epochs=epochs,
                seed=seed,
                record_trajectory=self.method == "exact",
                verbose=verbose,
                callbacks=callbacks,
            )
            result = model.hypergradient(
                x_h,
                y_h,
                method=self.method,
                curvature=self.curvature,
                reverse_steps=self.reverse_steps,
                max_growth=self.max_growth,
                verbose=verbose,
            )
            grads, hset_loss = result.grads, result.hset_loss
            next_values, next_state = self.meta_optimizer.step(
                values, grads, state
            )

        val_loss, val_error = model.evaluate_split(x_v, y_v)
        self.save_model(trial.trial_id, model)
        arrays = {f"start/{k}": np.asarray(v) for k, v in values.items()}
        arrays.update({f"grad/{k}": v for k, v in grads.items()})
        arrays.update({f"next/{k}": v for k, v in next_values.items()})
        arrays.update({f"opt/{k}": v for k, v in next_state.items()})
        arrays.update({f"optprev/{k}": v for k, v in state.items()})
        arrays["theta_0_norm"] = np.asarray(
            float(
                np.sqrt(
                    sum(np.sum(np.square(t)) for t in model.last_run.theta_0)
                )
            )
        )
        save_episode(
            os.path.join(self.get_trial_dir(trial.trial_id), EPISODE_FILE),
            arrays,
        )

        grad_norm = float(
            np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
        )
        metrics = {
            "val_error": val_error,
            "val_loss": val_loss,
            "hset_loss": hset_loss,
            "train_loss": float(np.mean(model.last_run.losses[-10:])),
            "hypergradient_norm": grad_norm,
            "seconds": time.time() - start,
        }
        for name, value in next_values.items():
            metrics[NEXT_PREFIX + name] = float(np.mean(value))
        logging.info("episode %d: %s", episode, metrics)
        if verbose:
            print(_episode_line(episode, values, metrics))
        return metrics

    def _episode_model(self, hp, x):
        """The model of this episode, built from `hp`.

        The build is seeded, so a model built for the same architecture and
        initial-weight seed would come out the same: such a model is reused
        with its initial weights restored, which keeps its compiled loops
        (tracing them again costs more than a short episode).
        """
        key = (
            self.hypermodel.init_seed(),
            sorted(
                (k, v)
                for k, v in hp.values.items()
                if options.kind_of(k) is None and k != CHAIN
            ),
        )
        cached = getattr(self, "_cached_model", None)
        if cached is not None and cached[0] == key:
            _, model, initial = cached
            for var, value in zip(model.trainable_variables, initial):
                var.assign(value)
            return model
        model = self._try_build(hp)
        if not model.built:
            model(np.asarray(x[:1]))
        initial = [v.numpy() for v in model.trainable_variables]
        self._cached_model = (key, model, initial)
        return model

    def _episode_start(self, trial):
        """Hyperparameters and meta-optimizer state that this episode
        starts from, and the scale of its meta steps.

        After a completed episode: the values and state it ended with.
        After episodes that failed since the last completed one: that
        episode's meta step again, scaled down by half per failure, so that
        the chain goes on from the last good values with a smaller step
        (under `t1t2`, the online meta steps of this run are scaled). The
        first episode takes the hyperparameters' values.
        """
        last, failures = _chain_history(
            self.oracle.get_trial, trial.trial_id, chain_of(trial)
        )
        saved = None
        if last is not None:
            path = os.path.join(self.get_trial_dir(last.trial_id), EPISODE_FILE)
            if os.path.exists(path):
                saved = load_episode(path)
        if saved is None:
            values = trial.hyperparameters.values
            return (
                {k: v for k, v in values.items() if options.kind_of(k)},
                {},
                1.0,
            )

        def part(prefix):
            return {
                k[len(prefix) :]: v
                for k, v in saved.items()
                if k.startswith(prefix)
            }

        if failures == 0:
            return part("next/"), part("opt/"), 1.0
        scale = 0.5**failures
        logging.warning(
            "episode %s: %d episode(s) failed since episode %s; retrying "
            "from its values with the meta step scaled by %g.",
            trial.trial_id,
            failures,
            last.trial_id,
            scale,
        )
        if self.method == "t1t2":
            return part("next/"), part("opt/"), scale
        values, state = self.meta_optimizer.step(
            part("start/"), part("grad/"), part("optprev/"), scale=scale
        )
        return values, state, 1.0

    def save(self):
        """Saves the tuner and its oracle, each file atomically."""
        if not self._is_worker():
            self.oracle.save()
        _save_state_atomically(self, self._get_tuner_fname())

    def load_model(self, trial):
        """The trial's model, its weights and every tuned hyperparameter
        as it trained with them (`log_l2` is a weight; the other kinds come
        from the trial's `episode.npz`)."""
        model = super().load_model(trial)
        path = os.path.join(self.get_trial_dir(trial.trial_id), EPISODE_FILE)
        if os.path.exists(path):
            start = {
                k[len("start/") :]: v
                for k, v in load_episode(path).items()
                if k.startswith("start/")
                and options.kind_of(k[len("start/") :]) not in (None, "log_l2")
            }
            model.set_hyperparameters(start)
        return model

    def save_model(self, trial_id, model, step=0):
        """Saves the weights (with `log_l2`) and the build config."""
        final = self._get_checkpoint_fname(trial_id)
        tmp = f"{final[: -len('.weights.h5')]}-{os.getpid()}.weights.h5"
        model.save_weights(tmp)
        os.replace(tmp, final)
        write_json(
            self._get_build_config_fname(trial_id), model.get_build_config()
        )

    # Results -----------------------------------------------------------------

    def episodes(self):
        """Every trial in chain order, as plain dicts.

        Returns:
            list of dict with `episode`, `trial_id`, `status`, one dict per
            tuned kind (`log_l2`, and `log_lr`, ... when tuned: name to the
            value the episode started from; per unit or per block: the
            mean), `next` (name to the value it handed on: after its meta
            step, or for `t1t2` where its run ended), the metrics, and
            `message` for failed trials.
        """
        rows = []
        for trial_id in self.oracle.start_order:
            trial = self.oracle.trials[trial_id]
            row = {
                "episode": int(trial_id),
                "chain": chain_of(trial),
                "trial_id": trial_id,
                "status": str(trial.status),
                "log_l2": {},
            }
            for k, v in trial.hyperparameters.values.items():
                kind = options.kind_of(k)
                if kind is not None:
                    row.setdefault(kind, {})[k] = v
            for name in trial.metrics.metrics:
                value = trial.metrics.get_last_value(name)
                if name.startswith(NEXT_PREFIX):
                    row.setdefault("next", {})[name[len(NEXT_PREFIX) :]] = value
                else:
                    row[name] = value
            if trial.message:
                row["message"] = trial.message
            rows.append(row)
        return rows

    def episode_arrays(self, trial_id):
        """The arrays saved with one episode (start, grad, next, opt)."""
        return load_episode(
            os.path.join(self.get_trial_dir(trial_id), EPISODE_FILE)
        )


def _pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"{name} must be a pair (x, y) of arrays; got "
            f"{type(value).__name__}."
        )
    return value


def _episode_line(episode, values, metrics):
    parts = []
    for kind in options.KINDS:
        named = [
            f"{name[len(kind) + 1 :]}={float(np.mean(v)):+.3f}"
            for name, v in values.items()
            if options.kind_of(name) == kind
        ]
        if named:
            parts.append(f"{kind} {' '.join(named)}")
    return (
        f"episode {episode:3d}  {'  '.join(parts)}  hset_loss "
        f"{metrics['hset_loss']:.4f}  val_error {metrics['val_error']:.4f}  "
        f"{metrics['seconds']:.1f}s"
    )


def write_json(path, obj):
    """Writes `obj` as JSON to `path` atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)
