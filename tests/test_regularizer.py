"""HyperRegularizer: the penalty, its names, its shapes, its saving."""

import keras
import numpy as np
import pytest
from helpers import mlp

import drmad_keras


@pytest.mark.parametrize(
    "layer, shape, axes",
    [
        (lambda: keras.layers.Dense(3), (5,), (1,)),
        (lambda: keras.layers.Conv2D(4, 3), (6, 6, 2), (0, 1, 3)),
    ],
)
@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_penalty_values(layer, shape, axes, granularity):
    layer = layer()
    reg = drmad_keras.HyperRegularizer(
        layer, init_log_l2=-1.5, granularity=granularity
    )
    reg(np.zeros((1,) + shape, "float32"))
    kernel = layer.kernel.numpy()
    fan_in = kernel.shape[-2]
    assert reg.log_l2.shape == (() if granularity == "layer" else (fan_in,))
    lam = np.exp(np.linspace(-3, 0, fan_in)).astype("float32")
    if granularity == "layer":
        lam = lam[0]
    reg.log_l2.assign(np.log(lam))
    per_unit = np.sum(kernel**2, axis=axes)
    want = lam * per_unit.sum() if granularity == "layer" else lam @ per_unit
    np.testing.assert_allclose(
        float(reg.penalty(reg.kernel, reg.log_l2)), want, rtol=1e-5
    )
    # The penalty also reaches the layer's losses, as Keras users expect.
    reg(np.zeros((1,) + shape, "float32"))
    assert len(reg.losses) == 1
    np.testing.assert_allclose(float(reg.losses[0]), want, rtol=1e-5)


def test_log_l2_is_not_trained_by_keras():
    reg = drmad_keras.HyperRegularizer(keras.layers.Dense(2, name="d"))
    reg(np.zeros((1, 3), "float32"))
    assert reg.log_l2 in reg.non_trainable_weights
    assert reg.hp_name == "log_l2_d"
    assert reg.name == "d_hyper"


def test_layer_without_kernel_is_refused():
    reg = drmad_keras.HyperRegularizer(keras.layers.Flatten())
    with pytest.raises(ValueError, match="kernel"):
        reg(np.zeros((1, 3, 3), "float32"))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"granularity": "row"}, ValueError),
        ({"init_log_l2": float("nan")}, ValueError),
        ({"init_log_l2": "big"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        drmad_keras.HyperRegularizer(keras.layers.Dense(2), **kwargs)


def test_not_a_layer():
    with pytest.raises(TypeError, match="Keras layer"):
        drmad_keras.HyperRegularizer("dense")
    inner = drmad_keras.HyperRegularizer(keras.layers.Dense(2))
    with pytest.raises(TypeError, match="not another"):
        drmad_keras.HyperRegularizer(inner)


def test_model_saves_and_loads(tmp_path):
    model = mlp(7, [5], granularity="unit")
    model(np.zeros((1, 7), "float32"))
    model.set_log_l2({"log_l2_h0": np.arange(7.0) - 5})
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, drmad_keras.DrMADModel)
    np.testing.assert_allclose(
        loaded.get_log_l2()["log_l2_h0"], np.arange(7.0) - 5
    )
    assert loaded.optimizer.alpha == pytest.approx(0.1)
    assert loaded.optimizer.gamma == pytest.approx(0.9)
