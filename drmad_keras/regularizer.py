"""`HyperRegularizer`: a layer wrapper holding a trainable L2 strength.

The strength lives in log space as the weight `log_l2`. It is a
non-trainable Keras weight, so that the elementary optimizer never touches
it; the tuner changes it between episodes from the hypergradient.
"""

import math

import keras
from keras import ops

from drmad_keras import options

GRANULARITIES = options.GRANULARITIES


@keras.saving.register_keras_serializable(package="drmad_keras")
class HyperRegularizer(keras.layers.Wrapper):
    """Adds `sum(exp(log_l2) * kernel**2)` of the wrapped layer to the losses.

    With granularity `"layer"` one `log_l2` scales the whole kernel; with
    `"unit"` there is one value per input unit of the kernel (per input
    channel for a convolution), and each scales the squared weights leaving
    that unit.

    Args:
        layer: `keras.layers.Layer`. The layer to regularize; it must have a
            `kernel` once built (`Dense`, `Conv1D`, `Conv2D`, ...).
        init_log_l2: float, default -4.0. Starting value of every `log_l2`.
        granularity: str, default `"layer"`. `"layer"` or `"unit"`.
        **kwargs: Passed to `keras.layers.Layer`; the default name is the
            wrapped layer's name with `_hyper` appended.

    Raises:
        TypeError: If `layer` is not a Keras layer.
        ValueError: If `granularity` is unknown or `init_log_l2` is not a
            finite number.
    """

    def __init__(self, layer, init_log_l2=-4.0, granularity="layer", **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "HyperRegularizer wraps a Keras layer with a kernel, such as "
                f"keras.layers.Dense; got {type(layer).__name__}."
            )
        if isinstance(layer, HyperRegularizer):
            raise TypeError(
                "HyperRegularizer wraps the layer with the kernel itself, "
                "not another HyperRegularizer."
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}; "
                f"got {granularity!r}."
            )
        try:
            init_log_l2 = float(init_log_l2)
        except (TypeError, ValueError):
            raise TypeError(
                f"init_log_l2 must be a number; got {init_log_l2!r}."
            ) from None
        if not math.isfinite(init_log_l2):
            raise ValueError(f"init_log_l2 must be finite; got {init_log_l2}.")
        kwargs.setdefault("name", f"{layer.name}_hyper")
        super().__init__(layer, **kwargs)
        self.init_log_l2 = init_log_l2
        self.granularity = granularity

    @property
    def hp_name(self):
        """str: The hyperparameter's name, derived from the wrapped layer."""
        return f"log_l2_{self.layer.name}"

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        kernel = getattr(self.layer, "kernel", None)
        if kernel is None:
            raise ValueError(
                f"HyperRegularizer needs a layer with a kernel; "
                f"{type(self.layer).__name__} {self.layer.name!r} has none."
            )
        shape = () if self.granularity == "layer" else (kernel.shape[-2],)
        self.log_l2 = self.add_weight(
            name="log_l2",
            shape=shape,
            initializer=keras.initializers.Constant(self.init_log_l2),
            trainable=False,
        )
        self.built = True

    @property
    def kernel(self):
        """The wrapped layer's kernel variable."""
        return self.layer.kernel

    def penalty(self, kernel, log_l2):
        """The penalty for given kernel and `log_l2` values.

        Args:
            kernel: tensor, shaped like the wrapped layer's kernel.
            log_l2: tensor, shaped like `self.log_l2`.

        Returns:
            A scalar tensor, differentiable in both arguments.
        """
        squares = ops.square(kernel)
        if self.granularity == "layer":
            return ops.exp(log_l2) * ops.sum(squares)
        # Sum over every axis but the input-unit axis (the one before last).
        axes = tuple(
            i for i in range(len(kernel.shape)) if i != len(kernel.shape) - 2
        )
        return ops.sum(ops.exp(log_l2) * ops.sum(squares, axis=axes))

    def call(self, inputs, *args, **kwargs):
        outputs = self.layer(inputs, *args, **kwargs)
        self.add_loss(self.penalty(self.layer.kernel, self.log_l2))
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            init_log_l2=self.init_log_l2, granularity=self.granularity
        )
        return config
