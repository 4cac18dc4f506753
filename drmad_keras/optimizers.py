"""The elementary optimizer: momentum SGD in the form DrMAD reverses."""

import keras

from drmad_keras import checks


@keras.saving.register_keras_serializable(package="drmad_keras")
class MomentumSGD(keras.optimizers.SGD):
    """Momentum SGD with step size `alpha` and momentum `gamma`.

    One elementary step is

        v = gamma * v - (1 - gamma) * grad
        theta = theta + alpha * v

    which is Keras' own SGD with `learning_rate = alpha * (1 - gamma)` and
    `momentum = gamma` (its velocity is `alpha * v`). `DrMADModel` reads
    `alpha` and `gamma` from here; a stock Keras model compiled with this
    optimizer trains with the same dynamics.

    Args:
        alpha: float, default 0.1. Step size, positive.
        gamma: float, default 0.9. Momentum, in [0, 1).
        **kwargs: Passed to `keras.optimizers.SGD` (not `learning_rate`,
            `momentum` or `nesterov`).

    Raises:
        ValueError: If `alpha` or `gamma` is out of range.
    """

    def __init__(self, alpha=0.1, gamma=0.9, **kwargs):
        alpha = checks.positive_float("alpha", alpha)
        gamma = checks.float_in_range("gamma", gamma, 0.0, 1.0)
        for name in ("learning_rate", "momentum", "nesterov"):
            if name in kwargs:
                raise TypeError(
                    f"MomentumSGD takes alpha and gamma, not {name!r}."
                )
        super().__init__(
            learning_rate=alpha * (1.0 - gamma), momentum=gamma, **kwargs
        )
        self.alpha = alpha
        self.gamma = gamma

    def get_config(self):
        config = super().get_config()
        for name in ("learning_rate", "momentum", "nesterov"):
            config.pop(name, None)
        config.update(alpha=self.alpha, gamma=self.gamma)
        return config
