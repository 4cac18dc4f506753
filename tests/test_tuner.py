"""DrMADTuner: chained episodes and every keras-tuner convenience."""

import keras
import keras_tuner
import numpy as np
import pytest
from helpers import mlp

import drmad_keras
from drmad_keras import tuner as tuner_lib

FIT = {"batch_size": 20, "steps": 25, "verbose": 0}


def _search(
    small_mnist,
    directory,
    max_trials,
    granularity="layer",
    overwrite=True,
    model_kwargs=None,
    **kwargs,
):
    tuner = tuner_lib.DrMADTuner(
        lambda hp: mlp(
            98,
            [8],
            granularity=granularity,
            init_log_l2=-2.0,
            **(model_kwargs or {}),
        ),
        max_trials=max_trials,
        directory=directory,
        project_name="chain",
        overwrite=overwrite,
        meta_learning_rate=0.3,
        **kwargs,
    )
    half = len(small_mnist["x_h"]) // 2
    tuner.search(
        small_mnist["x_e"],
        small_mnist["y_e"],
        hyper_data=(small_mnist["x_h"][:half], small_mnist["y_h"][:half]),
        validation_data=(small_mnist["x_h"][half:], small_mnist["y_h"][half:]),
        **FIT,
    )
    return tuner


def _start_and_next(tuner):
    trials = [tuner.oracle.trials[t] for t in tuner.oracle.start_order]
    return [tuner.episode_arrays(t.trial_id) for t in trials], trials


def test_each_trial_starts_where_the_last_ended(small_mnist, tmp_path):
    tuner = _search(small_mnist, tmp_path, 3)
    arrays, trials = _start_and_next(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    assert trials[0].hyperparameters.values == {
        "log_l2_h0": -2.0,
        "log_l2_out": -2.0,
    }
    for before, after, trial in zip(arrays, arrays[1:], trials[1:]):
        for name in ("log_l2_h0", "log_l2_out"):
            np.testing.assert_allclose(
                after[f"start/{name}"], before[f"next/{name}"], rtol=1e-6
            )
            assert trial.hyperparameters.get(name) == pytest.approx(
                float(before[f"next/{name}"]), rel=1e-6
            )
            assert before[f"next/{name}"] != before[f"start/{name}"]
    # theta_0 is the same in every episode by default.
    norms = [float(a["theta_0_norm"]) for a in arrays]
    assert norms[0] == norms[1] == norms[2]
    assert len(tuner.oracle.get_space().space) == 2


def test_best_models_and_hyperparameters(small_mnist, tmp_path):
    tuner = _search(small_mnist, tmp_path, 3)
    best_trial = tuner.oracle.get_best_trials(1)[0]
    errors = [
        tuner.oracle.trials[t].metrics.get_last_value("val_error")
        for t in tuner.oracle.start_order
    ]
    assert best_trial.metrics.get_last_value("val_error") == min(errors)
    best_hp = tuner.get_best_hyperparameters()[0]
    assert best_hp.values == best_trial.hyperparameters.values

    model = tuner.get_best_models()[0]
    assert isinstance(model, drmad_keras.DrMADModel)
    for name, value in model.get_log_l2().items():
        assert float(value) == pytest.approx(best_hp.get(name), rel=1e-6)
    half = len(small_mnist["x_h"]) // 2
    _, error = model.evaluate_split(
        small_mnist["x_h"][half:], small_mnist["y_h"][half:]
    )
    assert error == pytest.approx(min(errors))
    tuner.results_summary()


def test_reload_continues_the_chain(small_mnist, tmp_path):
    whole = _search(small_mnist, tmp_path / "whole", 4)
    _search(small_mnist, tmp_path / "split", 2)
    resumed = _search(small_mnist, tmp_path / "split", 4, overwrite=False)
    assert len(resumed.oracle.trials) == 4
    for a, b in zip(whole.episodes(), resumed.episodes()):
        assert a["log_l2"] == pytest.approx(b["log_l2"], rel=1e-6)
        assert a["hset_loss"] == pytest.approx(b["hset_loss"], rel=1e-5)


def test_per_unit_values_travel_with_the_trial(small_mnist, tmp_path):
    tuner = _search(small_mnist, tmp_path, 2, granularity="unit")
    arrays, trials = _start_and_next(tuner)
    start_1 = arrays[1]["start/log_l2_h0"]
    assert start_1.shape == (98,)
    np.testing.assert_allclose(start_1, arrays[0]["next/log_l2_h0"])
    assert np.std(start_1) > 0
    # The scalar hyperparameter holds the mean of the unit values.
    assert trials[1].hyperparameters.get("log_l2_h0") == pytest.approx(
        float(np.mean(start_1)), rel=1e-6
    )
    model = tuner.load_model(trials[1])
    np.testing.assert_allclose(
        model.get_log_l2()["log_l2_h0"], start_1, rtol=1e-6
    )


def test_compiled_model_instance(small_mnist, tmp_path):
    model = mlp(98, [8], init_log_l2=-2.5)
    tuner = tuner_lib.DrMADTuner(
        model,
        max_trials=2,
        directory=tmp_path,
        project_name="instance",
        meta_optimizer="sign_sgd",
        meta_learning_rate=0.5,
    )
    tuner.search(
        small_mnist["x_e"],
        small_mnist["y_e"],
        hyper_data=(small_mnist["x_h"], small_mnist["y_h"]),
        validation_data=(small_mnist["x_h"], small_mnist["y_h"]),
        **FIT,
    )
    values = [
        tuner.oracle.trials[t].hyperparameters.values
        for t in tuner.oracle.start_order
    ]
    for name in ("log_l2_h0", "log_l2_out"):
        assert abs(values[1][name] - values[0][name]) == pytest.approx(0.5)


def test_build_must_return_a_drmad_model(tmp_path):
    def build(hp):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    with pytest.raises(TypeError, match="DrMADModel"):
        tuner_lib.DrMADTuner(build, directory=tmp_path)


def test_meta_optimizers():
    values = {"a": np.array([0.0, 0.0, -11.9])}
    grads = {"a": np.array([2.0, -0.001, 5.0])}
    sign = tuner_lib.MetaOptimizer("sign_sgd", 0.25, (-12.0, 2.0))
    new, _ = sign.step(values, grads, {})
    np.testing.assert_allclose(new["a"], [-0.25, 0.25, -12.0])
    adam = tuner_lib.MetaOptimizer("adam", 0.1, (-12.0, 2.0))
    new, state = adam.step(values, grads, {})
    # Adam's first step is lr * sign(g), whatever the scale of g.
    np.testing.assert_allclose(new["a"], [-0.1, 0.1, -12.0], atol=1e-6)
    assert float(state["count"]) == 1.0
    with pytest.raises(ValueError, match="meta_optimizer"):
        tuner_lib.MetaOptimizer("rmsprop")
    assert isinstance(tuner_lib.DrMADOracle(), keras_tuner.Oracle)


def test_several_chains(small_mnist, tmp_path):
    tuner = _search(
        small_mnist,
        tmp_path,
        6,
        chains=3,
        initial_values=[None, {"log_l2_h0": -4.0}],
        log_l2_range=(-6.0, -1.0),
    )
    rows = tuner.episodes()
    assert [r["chain"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert all(r["status"] == "COMPLETED" for r in rows)
    assert rows[0]["log_l2"] == {"log_l2_h0": -2.0, "log_l2_out": -2.0}
    assert rows[1]["log_l2"]["log_l2_h0"] == -4.0
    assert rows[1]["log_l2"]["log_l2_out"] == -2.0
    drawn = rows[2]["log_l2"]
    assert all(-6.0 <= v <= -1.0 for v in drawn.values())
    assert drawn != rows[0]["log_l2"]
    # Each chain goes on from its own last episode.
    for first, second in zip(rows[:3], rows[3:]):
        arrays = tuner.episode_arrays(first["trial_id"])
        for name, value in second["log_l2"].items():
            assert value == pytest.approx(
                float(arrays[f"next/{name}"]), rel=1e-6
            )
    # The best of all chains.
    best = tuner.get_best_hyperparameters()[0].values
    best_error = min(r["val_error"] for r in rows)
    assert [r["log_l2"] for r in rows if r["val_error"] == best_error][0] == {
        k: v for k, v in best.items() if k != "chain"
    }


ALL_KINDS = ("log_l2", "log_lr", "logit_momentum", "log_init_scale")


@pytest.mark.parametrize("method", ["drmad", "exact"])
def test_every_kind_is_tuned_and_reported(small_mnist, tmp_path, method):
    tuner = _search(
        small_mnist,
        tmp_path,
        3,
        method=method,
        model_kwargs={"tune": ALL_KINDS, "schedule_blocks": 2},
    )
    arrays, trials = _start_and_next(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    names = [f"{k}_{layer}" for k in ALL_KINDS for layer in ("h0", "out")]
    assert sorted(trials[0].hyperparameters.values) == sorted(names)
    assert trials[0].hyperparameters.get("log_lr_h0") == pytest.approx(
        np.log(0.1)
    )
    for before, after in zip(arrays, arrays[1:]):
        for name in names:
            np.testing.assert_allclose(
                after[f"start/{name}"], before[f"next/{name}"], rtol=1e-6
            )
            assert np.shape(after[f"grad/{name}"]) == np.shape(
                after[f"start/{name}"]
            )
            assert np.all(after[f"grad/{name}"] != 0.0)
    # Block values move apart: the schedule is really per block.
    last = arrays[-1]["next/log_lr_out"]
    assert last.shape == (2,) and last[0] != last[1]
    low, high = drmad_keras.options.RANGES["logit_momentum"]
    assert low <= np.min(arrays[-1]["next/logit_momentum_h0"]) <= high

    rows = tuner.episodes()
    assert set(rows[1]["log_lr"]) == {"log_lr_h0", "log_lr_out"}
    assert rows[1]["next"]["log_lr_out"] == pytest.approx(
        float(np.mean(arrays[1]["next/log_lr_out"])), rel=1e-6
    )
    # The best model comes back with every kind it trained with.
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = tuner.get_best_models(1)[0].get_hyperparameters()
    saved = tuner.episode_arrays(best_trial.trial_id)
    for name in names:
        np.testing.assert_allclose(best[name], saved[f"start/{name}"])
    assert rows[1]["log_init_scale"]["log_init_scale_out"] == pytest.approx(
        float(arrays[0]["next/log_init_scale_out"]), rel=1e-6
    )


def test_t1t2_lowers_the_hset_loss_within_one_run(small_mnist):
    # Same theta_0, same batches: a plain run at the starting log_l2
    # against one that tunes log_l2 every 5 steps.
    model = mlp(98, [20], init_log_l2=-3.0)
    theta_0 = [v.numpy() for v in model.trainable_variables]
    fit = {"batch_size": 20, "steps": 200, "seed": 0, "verbose": 0}
    model.fit(small_mnist["x_e"], small_mnist["y_e"], **fit)
    plain = model.evaluate_split(small_mnist["x_h"], small_mnist["y_h"])[0]

    for var, value in zip(model.trainable_variables, theta_0):
        var.assign(value)
    meta = tuner_lib.MetaOptimizer("adam", 0.05)
    state = [{}]

    def meta_step(values, grads):
        new, state[0] = meta.step(values, grads, state[0])
        return new

    online = model.fit_t1t2(
        small_mnist["x_e"],
        small_mnist["y_e"],
        small_mnist["x_h"],
        small_mnist["y_h"],
        meta_step,
        interval=5,
        **fit,
    )
    tuned = model.evaluate_split(small_mnist["x_h"], small_mnist["y_h"])[0]
    print(f"HSet loss: plain {plain:.4f}, t1t2 {tuned:.4f}")
    assert tuned < 0.95 * plain
    assert online.history["log_l2_h0"].shape == (40,)
    assert online.grads["log_l2_out"].shape == (40,)
    assert model.get_log_l2()["log_l2_out"] < -3.5
    with pytest.raises(ValueError, match="fit_t1t2"):
        model.hypergradient(small_mnist["x_h"], small_mnist["y_h"])


def test_t1t2_tuner_chains_runs(small_mnist, tmp_path):
    tuner = _search(small_mnist, tmp_path, 2, method="t1t2", t1t2_interval=5)
    arrays, trials = _start_and_next(tuner)
    assert [t.status for t in trials] == ["COMPLETED"] * 2
    for name in ("log_l2_h0", "log_l2_out"):
        np.testing.assert_allclose(
            arrays[1][f"start/{name}"], arrays[0][f"next/{name}"], rtol=1e-6
        )
        assert arrays[0][f"next/{name}"] != arrays[0][f"start/{name}"]
    # The meta-optimizer's state goes on from run to run: 5 meta steps of
    # 25 elementary steps each.
    assert float(arrays[1]["opt/count"]) == 10.0
    # The saved model holds the final log_l2 of its run.
    best = tuner.get_best_models(1)[0]
    assert set(best.get_log_l2()) == {"log_l2_h0", "log_l2_out"}

    with pytest.raises(NotImplementedError, match="log_l2 only"):
        _search(
            small_mnist,
            tmp_path / "kinds",
            1,
            method="t1t2",
            model_kwargs={"tune": ("log_l2", "log_lr")},
        )


def test_each_kind_is_clipped_to_its_range():
    meta = tuner_lib.MetaOptimizer(
        "sign_sgd", 10.0, log_l2_range=(-5.0, -1.0), ranges={"log_lr": (-3, 0)}
    )
    values = {"log_l2_a": -3.0, "log_lr_a": -2.0, "logit_momentum_a": 0.0}
    down = {name: 1.0 for name in values}
    new, _ = meta.step(values, down, {})
    assert new == {
        "log_l2_a": -5.0,
        "log_lr_a": -3.0,
        "logit_momentum_a": drmad_keras.options.RANGES["logit_momentum"][0],
    }
    with pytest.raises(ValueError, match="ranges kind"):
        tuner_lib.MetaOptimizer(ranges={"log_l2": (-5.0, 0.0)})
    with pytest.raises(ValueError, match="low < high"):
        tuner_lib.MetaOptimizer(ranges={"log_lr": (0.0, -5.0)})


def test_search_refuses_settings_an_episode_would_fail_on(
    small_mnist, tmp_path
):
    for kwargs, model_kwargs, match in [
        ({}, {"tune": ("log_lr",), "schedule_blocks": 30}, "30 blocks"),
        ({"reverse_steps": 5}, {"tune": ("log_init_scale",)}, "whole"),
        ({"reverse_steps": 50}, {}, "cannot exceed"),
    ]:
        with pytest.raises(ValueError, match=match):
            _search(
                small_mnist,
                tmp_path / match.replace(" ", "_"),
                1,
                model_kwargs=model_kwargs,
                **kwargs,
            )
        assert not list(tmp_path.glob("**/trial.json"))
