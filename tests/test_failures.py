"""Bad input, divergence and interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import mlp
from test_train_mnist import ROOT
from test_train_mnist import SCRIPT
from test_train_mnist import TINY

import drmad_keras
from drmad_keras import train
from drmad_keras import tuner as tuner_lib

# Bad input to the library ------------------------------------------------


def _fitted(small_mnist):
    model = mlp(98, [4])
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=3,
        verbose=0,
    )
    return model


def test_model_without_hyper_regularizer(small_mnist):
    x_in = keras.Input((98,))
    model = drmad_keras.DrMADModel(x_in, keras.layers.Dense(10)(x_in))
    model.compile(optimizer=drmad_keras.MomentumSGD(), loss="mse")
    with pytest.raises(ValueError, match="no HyperRegularizer"):
        model.fit(small_mnist["x_e"], small_mnist["y_e"], steps=2)


def test_hypergradient_before_fit(small_mnist):
    with pytest.raises(ValueError, match="fit"):
        mlp(98, [4]).hypergradient(small_mnist["x_h"], small_mnist["y_h"])


def test_exact_without_trajectory(small_mnist):
    model = _fitted(small_mnist)
    with pytest.raises(ValueError, match="record_trajectory"):
        model.hypergradient(
            small_mnist["x_h"], small_mnist["y_h"], method="exact", verbose=0
        )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, y: (x[:, :50], y), ValueError, "do not fit"),
        (lambda x, y: (x, y + 5), ValueError, r"labels must be in \[0, 10\)"),
        (
            lambda x, y: (np.where(x > 0.5, np.nan, x), y),
            ValueError,
            "non-finite",
        ),
        (lambda x, y: (x, y[:10]), ValueError, "same number"),
    ],
)
def test_bad_data(small_mnist, change, error, match):
    model = mlp(98, [4])
    x, y = change(small_mnist["x_e"], small_mnist["y_e"])
    with pytest.raises(error, match=match):
        model.fit(x, y, batch_size=20, steps=2, verbose=0)
    fitted = _fitted(small_mnist)
    x, y = change(small_mnist["x_h"], small_mnist["y_h"])
    with pytest.raises(error, match=match):
        fitted.hypergradient(x, y, verbose=0)


def test_seed_must_be_an_integer(small_mnist):
    model = mlp(98, [4])
    for seed, error in ((None, TypeError), (1.5, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="seed"):
            model.fit(
                small_mnist["x_e"],
                small_mnist["y_e"],
                batch_size=20,
                steps=2,
                seed=seed,
                verbose=0,
            )


def test_duplicate_layer_names_are_refused(small_mnist):
    x_in = keras.Input((98,))
    h = drmad_keras.HyperRegularizer(keras.layers.Dense(8, name="same"))(x_in)
    out = drmad_keras.HyperRegularizer(
        keras.layers.Dense(10, name="same"), name="again"
    )(h)
    model = drmad_keras.DrMADModel(x_in, out)
    model.compile(
        optimizer=drmad_keras.MomentumSGD(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(ValueError, match="same name"):
        model.fit(small_mnist["x_e"], small_mnist["y_e"], steps=2)


def test_float_labels(small_mnist):
    model = mlp(98, [4])
    y = small_mnist["y_e"].astype("float32")
    model.fit(small_mnist["x_e"], y, batch_size=20, steps=2, verbose=0)
    with pytest.raises(ValueError, match="whole class ids"):
        model.fit(small_mnist["x_e"], y + 0.5, batch_size=20, steps=2)
    with pytest.raises(ValueError, match="labels must be in"):
        model.fit(small_mnist["x_e"], y + 10.0, batch_size=20, steps=2)


def test_search_refuses_bad_data_before_any_episode(small_mnist, tmp_path):
    tuner = tuner_lib.DrMADTuner(
        lambda hp: mlp(98, [4]),
        max_trials=2,
        directory=tmp_path,
        project_name="bad",
    )
    x, y = small_mnist["x_e"], small_mnist["y_e"]
    cases = [
        ({"validation_data": (x, y)}, TypeError, "hyper_data"),
        (
            {"hyper_data": (x,), "validation_data": (x, y)},
            ValueError,
            "hyper_data must be a pair",
        ),
        (
            {"hyper_data": (x[:, :50], y), "validation_data": (x, y)},
            ValueError,
            "hyper_data: inputs of shape",
        ),
        (
            {"hyper_data": (x, y), "validation_data": (x, y + 3)},
            ValueError,
            "validation_data: labels",
        ),
        (
            {"hyper_data": (x, y), "validation_data": (x, y), "foo": 1},
            TypeError,
            "foo",
        ),
        (
            {
                "hyper_data": (x, y),
                "validation_data": (x, y),
                "batch_size": 1000,
            },
            ValueError,
            "batch_size",
        ),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            tuner.search(x, y, verbose=0, **kwargs)
    assert tuner.oracle.trials == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 1000}, "larger than"),
        ({"validation_data": None}, "does not take"),
    ],
)
def test_bad_fit_arguments(small_mnist, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        mlp(98, [4]).fit(small_mnist["x_e"], small_mnist["y_e"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "adjoint"}, "method"),
        ({"curvature": "fisher"}, "curvature"),
        ({"reverse_steps": 10}, "reverse_steps"),
        ({"reverse_steps": 0}, "reverse_steps"),
    ],
)
def test_bad_hypergradient_arguments(small_mnist, kwargs, match):
    model = _fitted(small_mnist)
    with pytest.raises(ValueError, match=match):
        model.hypergradient(
            small_mnist["x_h"], small_mnist["y_h"], verbose=0, **kwargs
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"alpha": float("inf")}, "alpha"),
    ],
)
def test_bad_momentum_sgd(kwargs, match):
    with pytest.raises(ValueError, match=match):
        drmad_keras.MomentumSGD(**kwargs)


def test_compile_needs_momentum_sgd():
    x_in = keras.Input((3,))
    model = drmad_keras.DrMADModel(x_in, keras.layers.Dense(2)(x_in))
    with pytest.raises(TypeError, match="MomentumSGD"):
        model.compile(optimizer="sgd", loss="mse")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"episodes": 0}, "episodes"),
        ({"batch_size": -1}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"momentum": 1.5}, "momentum"),
        ({"init_log_l2": float("nan")}, "init_log_l2"),
        ({"init_log_l2": 5.0}, "init_log_l2"),
        ({"seed": 2**32}, "seed"),
        ({"hidden": ()}, "hidden"),
        ({"activation": "swish2"}, "activation"),
        ({"curvature": "fisher"}, "curvature"),
        ({"meta_optimizer": "sgd"}, "meta_optimizer"),
        ({"granularity": "row"}, "granularity"),
        ({"steps": 5, "reverse_steps": 6}, "reverse_steps"),
        ({"tune": ("log_l3",)}, "tune"),
        ({"tune": ()}, "tune"),
        ({"tune": "log_l2"}, "tune"),
        ({"tune": ("log_lr", "log_lr")}, "twice"),
        ({"schedule_blocks": 0}, "schedule_blocks"),
        ({"steps": 5, "schedule_blocks": 6}, "schedule_blocks"),
        ({"t1t2_interval": 0}, "t1t2_interval"),
        ({"method": "t1t2", "tune": ("log_l2", "log_lr")}, "log_l2 only"),
        ({"momentum": 0.0, "tune": ("logit_momentum",)}, "momentum"),
        ({"tune": ("log_init_scale",), "reverse_steps": 10}, "whole reverse"),
        ({"schedule_blocks": 2}, "has neither"),
        ({"ranges": (("log_l2", -5.0, 0.0),)}, "ranges kind"),
        ({"ranges": (("log_lr", 0.0, -5.0),)}, "low < high"),
        ({"ranges": (("log_lr", -5.0),)}, "kind, low, high"),
        ({"ranges": (("log_lr", -5, 0), ("log_lr", -4, 0))}, "twice"),
        ({"method": "t1t2", "reverse_steps": 10}, "t1t2 has none"),
        ({"method": "t1t2", "curvature": "hessian"}, "t1t2 has none"),
        ({"method": "t1t2", "hset": 40, "batch_size": 50}, "HSet"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        train.Config(**kwargs)


# Files -----------------------------------------------------------------

TINY_CONFIG = dict(
    episodes=1,
    steps=10,
    hidden=(4,),
    eset=100,
    hset=50,
    vset=50,
    test=50,
    batch_size=20,
    verbose=0,
)


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = train.Config(output_dir=str(blocker / "run"), **TINY_CONFIG)
    with pytest.raises(ValueError, match="cannot be written"):
        train.run(config)


def test_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = train.Config(output_dir=str(blocker), **TINY_CONFIG)
    with pytest.raises(ValueError, match="is a file"):
        train.run(config)


def test_output_dir_of_another_configuration(tmp_path):
    train.run(train.Config(output_dir=str(tmp_path), **TINY_CONFIG))
    other = dict(TINY_CONFIG, hidden=(5,))
    with pytest.raises(ValueError, match="hidden"):
        train.run(train.Config(output_dir=str(tmp_path), **other))
    other = dict(TINY_CONFIG, tune=("log_l2", "log_lr"))
    with pytest.raises(ValueError, match="tune"):
        train.run(train.Config(output_dir=str(tmp_path), **other))

    # A run saved before a setting existed counts it at its default.
    saved = tmp_path / "config.json"
    settings = json.loads(saved.read_text())
    del settings["tune"], settings["t1t2_interval"]
    saved.write_text(json.dumps(settings))
    more = dict(TINY_CONFIG, episodes=2)
    results = train.run(train.Config(output_dir=str(tmp_path), **more))
    assert len(results["episodes"]) == 2


def test_second_process_on_the_same_output_dir(tmp_path):
    config = train.Config(output_dir=str(tmp_path), **TINY_CONFIG)
    with train._exclusive(str(tmp_path)):
        with pytest.raises(RuntimeError, match="in use by another run"):
            train.run(config)
    # Once free, it runs.
    assert train.run(config)["episodes"][0]["status"] == "COMPLETED"


# Divergence ------------------------------------------------------------


def test_diverged_episode_fails_and_the_chain_goes_on(small_mnist, tmp_path):
    class AbsurdStepFarFromStart(keras.callbacks.Callback):
        """Far from the start, the step size is absurd: training diverges."""

        def on_train_begin(self, logs=None):
            log_l2 = float(self.model.get_log_l2()["log_l2_h0"])
            self.model.optimizer.alpha = 1e4 if abs(log_l2 + 2) > 0.3 else 0.1

    tuner = tuner_lib.DrMADTuner(
        lambda hp: mlp(98, [8], init_log_l2=-2.0),
        max_trials=3,
        directory=tmp_path,
        project_name="diverge",
        meta_optimizer="sign_sgd",
        meta_learning_rate=0.4,
    )
    tuner.search(
        small_mnist["x_e"],
        small_mnist["y_e"],
        hyper_data=(small_mnist["x_h"], small_mnist["y_h"]),
        validation_data=(small_mnist["x_h"], small_mnist["y_h"]),
        batch_size=20,
        steps=25,
        verbose=0,
        callbacks=[AbsurdStepFarFromStart()],
    )
    rows = tuner.episodes()
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert "non-finite" in rows[1]["message"]
    assert "hset_loss" not in rows[1]
    start = rows[0]["log_l2"]["log_l2_h0"]
    # The retry goes back to the last good values with half the step.
    assert abs(rows[1]["log_l2"]["log_l2_h0"] - start) == pytest.approx(0.4)
    assert abs(rows[2]["log_l2"]["log_l2_h0"] - start) == pytest.approx(0.2)
    for row in (rows[0], rows[2]):
        assert np.isfinite(row["hset_loss"])


# Interruption ----------------------------------------------------------


def _comparable(path):
    results = json.loads(path.read_text())
    return [
        {k: v for k, v in e.items() if k != "seconds"}
        for e in results["episodes"]
    ]


def test_killed_run_resumes_to_the_same_results(tmp_path):
    # Episodes long enough that the kill lands in the middle of the run.
    args = TINY + ["--episodes=4", "--steps=2000"]
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    whole = tmp_path / "whole"
    done = subprocess.run(
        [sys.executable, SCRIPT, *args, f"--output_dir={whole}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr

    # Kill the second run with SIGKILL once episode 1 has finished.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args, f"--output_dir={killed}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 240
    for line in proc.stdout:
        if line.startswith("episode   1") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What finished before the kill is already in results.json.
    partial = json.loads((killed / "results.json").read_text())["episodes"]
    assert [e["episode"] for e in partial][:1] == [0]
    assert len(partial) < 4
    assert all(e["status"] == "COMPLETED" for e in partial)

    again = subprocess.run(
        [sys.executable, SCRIPT, *args, f"--output_dir={killed}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "episode   0" not in again.stdout
    assert _comparable(killed / "results.json") == _comparable(
        whole / "results.json"
    )
