"""DrMADModel: the meta-forward and the hypergradient of a training run."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import mlp
from helpers import reset_to

import drmad_keras
from drmad_keras import reverse


def _hset_loss_after_fit(model, data, theta_0, values, steps, seed):
    model.set_hyperparameters(values)
    reset_to(model, theta_0)
    model.fit(
        data["x_e"],
        data["y_e"],
        batch_size=16,
        steps=steps,
        seed=seed,
        verbose=0,
    )
    return model.evaluate_split(data["x_h"], data["y_h"])[0]


def _central_difference(model, data, theta_0, start, name, c, eps, steps, seed):
    """`d HSet loss / d start[name][c]` by retraining at `+- eps` from the
    same `theta_0` and batch order."""
    plus = {k: np.array(v) for k, v in start.items()}
    minus = {k: np.array(v) for k, v in start.items()}
    plus[name][c] += eps
    minus[name][c] -= eps
    return (
        _hset_loss_after_fit(model, data, theta_0, plus, steps, seed)
        - _hset_loss_after_fit(model, data, theta_0, minus, steps, seed)
    ) / (2 * eps)


@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_exact_matches_finite_differences(small_mnist, float64, granularity):
    model = mlp(98, [6], granularity=granularity, init_log_l2=-2.0)
    steps, seed = 15, 3
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=16,
        steps=steps,
        seed=seed,
        record_trajectory=True,
        verbose=0,
    )
    theta_0 = model.last_run.theta_0
    start = model.get_log_l2()
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], method="exact", verbose=0
    )
    assert result.method == "exact" and result.curvature == "hessian"

    # Central differences, retraining from the same theta_0 and batch order.
    eps = 1e-4
    rng = np.random.default_rng(0)
    for name, value in start.items():
        coords = (
            [()]
            if value.ndim == 0
            else [(int(i),) for i in rng.choice(value.size, 4, replace=False)]
        )
        for c in coords:
            fd = _central_difference(
                model, small_mnist, theta_0, start, name, c, eps, steps, seed
            )
            got = result.grads[name][c]
            assert abs(got - fd) <= 0.02 * abs(fd) + 1e-9, (name, c, got, fd)


@pytest.mark.parametrize("kind", ["log_lr", "logit_momentum", "log_init_scale"])
def test_exact_optimizer_and_scale_hypergradients_match_finite_differences(
    small_mnist, float64, kind
):
    # Two schedule blocks: log_lr and logit_momentum hold two values each.
    model = mlp(
        98,
        [6],
        init_log_l2=-2.0,
        alpha=0.3,
        gamma=0.8,
        tune=(kind,),
        schedule_blocks=1 if kind == "log_init_scale" else 2,
    )
    steps, seed = 15, 3
    theta_0 = [tf.identity(v) for v in model.trainable_variables]
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=16,
        steps=steps,
        seed=seed,
        record_trajectory=True,
        verbose=0,
    )
    start = model.get_hyperparameters()
    assert sorted(start) == [f"{kind}_h0", f"{kind}_out"]
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], method="exact", verbose=0
    )

    eps = 1e-5
    for name, value in start.items():
        for c in [()] if value.ndim == 0 else [(0,), (1,)]:
            fd = _central_difference(
                model, small_mnist, theta_0, start, name, c, eps, steps, seed
            )
            got = result.grads[name][c]
            assert abs(fd) > 1e-4, (name, c, fd)
            assert abs(got - fd) <= 1e-4 * abs(fd), (name, c, got, fd)


def test_schedule_blocks_change_the_run(small_mnist, float64):
    # A larger step size in the second block only changes only the second
    # half of the run.
    model = mlp(98, [6], tune=("log_lr",), schedule_blocks=2)
    theta_0 = [tf.identity(v) for v in model.trainable_variables]
    runs = []
    for second in [np.log(0.1), np.log(0.3)]:
        reset_to(model, theta_0)
        model.set_hyperparameters(
            {
                name: [np.log(0.1), second]
                for name in model.get_hyperparameters()
            }
        )
        model.fit(
            small_mnist["x_e"],
            small_mnist["y_e"],
            batch_size=16,
            steps=10,
            verbose=0,
        )
        runs.append(model.last_run.losses)
    np.testing.assert_array_equal(runs[0][:6], runs[1][:6])
    assert not np.allclose(runs[0][6:], runs[1][6:])


def test_tuned_kinds_survive_serialization(small_mnist):
    model = mlp(98, [6], tune=("log_l2", "log_lr"), schedule_blocks=3)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(model)
    )
    assert clone.tuned_kinds == ("log_l2", "log_lr")
    assert clone.schedule_blocks == 3
    assert clone.get_hyperparameters()["log_lr_h0"].shape == (3,)


def test_bad_tuning_settings_are_refused(small_mnist):
    with pytest.raises(ValueError, match="tune must be one of"):
        mlp(98, [6], tune=("log_l3",))
    with pytest.raises(ValueError, match="gamma above 0"):
        mlp(98, [6], gamma=0.0, tune=("logit_momentum",))
    with pytest.raises(ValueError, match="has neither"):
        mlp(98, [6], schedule_blocks=2)
    with pytest.raises(ValueError, match="sequence of kinds"):
        mlp(98, [6], tune=None)
    model = mlp(98, [6], tune=("log_lr", "log_init_scale"))
    with pytest.raises(ValueError, match="shape"):
        model.set_hyperparameters({"log_lr_h0": [1.0, 2.0]})
    with pytest.raises(KeyError, match="logit_momentum_h0"):
        model.set_hyperparameters({"logit_momentum_h0": 0.0})
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=16,
        steps=5,
        verbose=0,
    )
    with pytest.raises(ValueError, match="whole reverse pass"):
        model.hypergradient(
            small_mnist["x_h"],
            small_mnist["y_h"],
            reverse_steps=2,
            verbose=0,
        )
    with pytest.warns(
        UserWarning, match="estimates these hypergradients poorly"
    ):
        result = model.hypergradient(
            small_mnist["x_h"], small_mnist["y_h"], verbose=0
        )
    assert np.all(np.isfinite(result.grads["log_lr_out"]))


def test_bad_hyperparameter_values_change_nothing(small_mnist):
    model = mlp(98, [6], tune=("log_l2", "log_lr", "logit_momentum"))
    before = model.get_hyperparameters()
    for values, error, match in [
        ({"log_lr_h0": -1.0, "bogus": 3.0}, KeyError, "bogus"),
        ({"log_lr_h0": -1.0, "log_l2_h0": np.nan}, ValueError, "finite"),
        ({"log_l2_h0": 1.0, "log_l2_out": "x"}, ValueError, "log_l2_out"),
        ({"log_l2_h0": 1.0, "logit_momentum_h0": 40.0}, ValueError, "1\\)"),
        ({"log_lr_out": -120.0}, ValueError, "step size"),
    ]:
        with pytest.raises(error, match=match):
            model.set_hyperparameters(values)
        after = model.get_hyperparameters()
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])


def test_fit_t1t2_refuses_a_bad_meta_step_and_keeps_the_start(small_mnist):
    model = mlp(98, [6], init_log_l2=-3.0)
    theta_0 = [v.numpy() for v in model.trainable_variables]
    calls = []

    def meta_step(values, grads):
        calls.append(1)
        bad = len(calls) == 4  # the last meta step of 40 steps / 10
        return {k: np.nan if bad else v - 0.1 for k, v in values.items()}

    with pytest.raises(ValueError, match="meta_step returned a bad value"):
        model.fit_t1t2(
            small_mnist["x_e"],
            small_mnist["y_e"],
            small_mnist["x_h"],
            small_mnist["y_h"],
            meta_step,
            batch_size=20,
            steps=40,
            interval=10,
            verbose=0,
        )
    for var, value in zip(model.trainable_variables, theta_0):
        np.testing.assert_array_equal(var.numpy(), value)
    assert all(v == -3.0 for v in model.get_log_l2().values())
    assert model.last_run is None
    with pytest.raises(ValueError, match="exactly the names"):
        model.fit_t1t2(
            small_mnist["x_e"],
            small_mnist["y_e"],
            small_mnist["x_h"],
            small_mnist["y_h"],
            lambda values, grads: {"log_l2_h1": 0.0},
            batch_size=20,
            steps=10,
            verbose=0,
        )


def _cosine(a, b):
    a = np.concatenate([np.ravel(v) for v in a.values()])
    b = np.concatenate([np.ravel(v) for v in b.values()])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_drmad_gauss_newton_agrees_with_exact(small_mnist):
    model = mlp(98, [20, 20], init_log_l2=-4.0, alpha=0.1, gamma=0.9)
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=200,
        seed=0,
        record_trajectory=True,
        verbose=0,
    )
    exact = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], method="exact", verbose=0
    )
    cosines = {}
    for curvature in ["gauss_newton", "hessian"]:
        try:
            result = model.hypergradient(
                small_mnist["x_h"],
                small_mnist["y_h"],
                method="drmad",
                curvature=curvature,
                verbose=0,
            )
            cosines[curvature] = _cosine(result.grads, exact.grads)
        except drmad_keras.DivergenceError as error:
            cosines[curvature] = f"diverged: {error}"
    print("cosine with exact:", cosines)
    assert cosines["gauss_newton"] >= 0.9


def test_default_curvature_of_drmad_is_gauss_newton(small_mnist):
    model = mlp(98, [4])
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=5,
        verbose=0,
    )
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], verbose=0
    )
    assert (result.method, result.curvature) == ("drmad", "gauss_newton")
    assert set(result.grads) == {"log_l2_h0", "log_l2_out"}
    assert np.isfinite(result.hset_loss)


def _numpy_reference(x, y, weights, log_l2, index, alpha, gamma):
    """Momentum SGD of DESIGN.md on softmax regression, by hand."""
    w, b = [np.array(a, dtype=np.float64) for a in weights]
    v_w, v_b = np.zeros_like(w), np.zeros_like(b)
    lam = np.exp(log_l2)
    for rows in index:
        xb, yb = x[rows], y[rows]
        logits = xb @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        g_w = xb.T @ p / len(yb) + 2.0 * lam[:, None] * w
        g_b = p.mean(axis=0)
        v_w = gamma * v_w - (1 - gamma) * g_w
        v_b = gamma * v_b - (1 - gamma) * g_b
        w, b = w + alpha * v_w, b + alpha * v_b
    return w, b


def test_train_step_and_fit_follow_the_recurrences(small_mnist, float64):
    model = mlp(
        98, [], granularity="unit", init_log_l2=-3.0, alpha=0.3, gamma=0.8
    )
    x, y = small_mnist["x_e"], small_mnist["y_e"]
    model(x[:1])
    log_l2 = np.linspace(-4.0, -1.0, 98)
    model.set_log_l2({"log_l2_out": log_l2})
    start = [v.numpy() for v in model.trainable_variables]
    index = reverse.batch_order(len(x), 25, 7, seed=5)
    want_w, want_b = _numpy_reference(x, y, start, log_l2, index, 0.3, 0.8)

    # The compiled loop of fit.
    model.fit(x, y, batch_size=25, steps=7, seed=5, verbose=0)
    np.testing.assert_allclose(
        model.trainable_variables[0], want_w, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        model.trainable_variables[1], want_b, rtol=1e-9, atol=1e-12
    )

    # train_step, one batch at a time, through Keras' own SGD equivalence.
    reset_to(model, start)
    for rows in index:
        model.train_on_batch(x[rows], y[rows])
    # Keras keeps the optimizer's learning rate in float32: looser tolerance.
    np.testing.assert_allclose(
        model.trainable_variables[0], want_w, rtol=1e-5, atol=1e-8
    )


def test_batch_order_stretches_match_the_whole_order():
    # The whole order, built directly: a fresh permutation per pass over
    # 103 examples, cut to whole batches of 10.
    rng = np.random.default_rng(7)
    whole = np.concatenate(
        [rng.permutation(103)[:100] for _ in range(5)]
    ).reshape(-1, 10)[:47]
    order = reverse.BatchOrder(103, 10, 47, seed=7)
    np.testing.assert_array_equal(np.asarray(order), whole)
    np.testing.assert_array_equal(reverse.batch_order(103, 10, 47, 7), whole)
    # Stretches in any order, as the reverse pass asks for them.
    for start, stop in [(40, 47), (9, 31), (0, 1), (10, 20), (46, 47)]:
        np.testing.assert_array_equal(order[start:stop], whole[start:stop])
    steps = np.arange(33, 12, -1)
    np.testing.assert_array_equal(order[steps], whole[steps])
    np.testing.assert_array_equal(order[5], whole[5])
    with pytest.raises(IndexError):
        order.rows(40, 48)


def test_fit_is_reproducible_from_seed_and_weights(small_mnist):
    model = mlp(98, [8])
    start = [tf.identity(v) for v in model.trainable_variables]
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=32,
        steps=30,
        seed=9,
        verbose=0,
    )
    first = [v.numpy() for v in model.trainable_variables]
    reset_to(model, start)
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=32,
        steps=30,
        seed=9,
        verbose=0,
    )
    for a, b in zip(first, model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
    reset_to(model, start)
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=32,
        steps=30,
        seed=10,
        verbose=0,
    )
    assert not np.array_equal(first[0], model.trainable_variables[0])


def test_drmad_holds_no_trajectory(small_mnist):
    model = mlp(98, [8])
    held = {}
    for steps in (10, 80):
        for record in (False, True):
            model.fit(
                small_mnist["x_e"],
                small_mnist["y_e"],
                batch_size=20,
                steps=steps,
                record_trajectory=record,
                verbose=0,
            )
            held[steps, record] = model.last_run.held_bytes()
    params = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    # theta_0 and theta_T only, whatever T is.
    assert held[10, False] == held[80, False] == 2 * params
    # The stored trajectory of exact grows as T copies.
    assert held[80, True] - held[80, False] == 80 * params
    # And drmad runs without it.
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], verbose=0
    )
    assert model.last_run.trajectory is not None
    model.last_run.trajectory = None
    again = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], verbose=0
    )
    for name in result.grads:
        np.testing.assert_allclose(
            again.grads[name], result.grads[name], rtol=1e-5
        )


def test_short_reverse_pass_uses_the_batches_of_its_steps(small_mnist, float64):
    model = mlp(98, [6], init_log_l2=-2.0)
    steps, short = 30, 8
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=16,
        steps=steps,
        seed=4,
        record_trajectory=True,
        verbose=0,
    )
    run = model.last_run
    objective = model.objective()
    _, d_theta = reverse.hset_gradient(
        objective,
        run.theta_T,
        tf.constant(small_mnist["x_h"]),
        tf.constant(small_mnist["y_h"]),
    )
    index = run.batch_order()
    truncated = reverse.meta_backward(
        objective,
        run.theta_0,
        run.theta_T,
        run.log_l2,
        run.x,
        run.y,
        index,
        run.alpha,
        run.gamma,
        d_theta,
        method="exact",
        curvature="hessian",
        reverse_steps=short,
        trajectory=run.trajectory,
    )
    # The same thing as a whole reverse pass over a run that starts at
    # step T - short with the remaining batches.
    tail = [t[steps - short :] for t in run.trajectory]
    whole = reverse.meta_backward(
        objective,
        [t[0] for t in tail],
        run.theta_T,
        run.log_l2,
        run.x,
        run.y,
        index[steps - short :],
        run.alpha,
        run.gamma,
        d_theta,
        method="exact",
        curvature="hessian",
        trajectory=tail,
    )
    for a, b in zip(truncated.d_log_l2, whole.d_log_l2):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    full = reverse.meta_backward(
        objective,
        run.theta_0,
        run.theta_T,
        run.log_l2,
        run.x,
        run.y,
        index,
        run.alpha,
        run.gamma,
        d_theta,
        method="exact",
        curvature="hessian",
        trajectory=run.trajectory,
    )
    assert not np.allclose(full.d_log_l2[0], truncated.d_log_l2[0])


def test_exploding_reverse_pass_is_reported(small_mnist):
    model = mlp(98, [20], alpha=0.1, gamma=0.9)
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=20,
        seed=0,
        verbose=0,
    )
    # A reverse state whose norm ends above max_growth times its start is
    # refused (a limit below 1 makes any pass trip it).
    run = model.last_run
    _, d_theta = reverse.hset_gradient(
        model.objective(),
        run.theta_T,
        tf.constant(small_mnist["x_h"], tf.float32),
        tf.constant(small_mnist["y_h"]),
    )
    with pytest.raises(drmad_keras.DivergenceError, match="norm") as info:
        reverse.meta_backward(
            model.objective(),
            run.theta_0,
            run.theta_T,
            run.log_l2,
            run.x,
            run.y,
            run.batch_order(),
            run.alpha,
            run.gamma,
            d_theta,
            curvature="hessian",
            max_growth=0.5,
        )
    assert info.value.phase == "meta-backward"
    with pytest.raises(ValueError, match="max_growth"):
        model.hypergradient(
            small_mnist["x_h"], small_mnist["y_h"], max_growth=float("nan")
        )


def test_non_finite_reverse_pass_is_reported(small_mnist):
    model = mlp(98, [20])
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=20,
        seed=0,
        verbose=0,
    )
    run = model.last_run
    d_theta = [tf.fill(w.shape, np.inf) for w in run.theta_T]
    with pytest.raises(drmad_keras.DivergenceError, match="non-finite"):
        reverse.meta_backward(
            model.objective(),
            run.theta_0,
            run.theta_T,
            run.log_l2,
            run.x,
            run.y,
            run.batch_order(),
            run.alpha,
            run.gamma,
            d_theta,
        )


def test_diverging_training_is_reported(small_mnist):
    model = mlp(98, [20], alpha=500.0, gamma=0.9, activation="relu")
    with pytest.raises(drmad_keras.DivergenceError, match="non-finite"):
        model.fit(
            small_mnist["x_e"] * 100,
            small_mnist["y_e"],
            batch_size=20,
            steps=200,
            verbose=0,
        )
    assert model.last_run is None


def test_end_to_end_one_meta_step_lowers_the_hset_loss(small_mnist):
    model = mlp(98, [16], init_log_l2=-2.0, alpha=0.3)
    theta_0 = [tf.identity(v) for v in model.trainable_variables]
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=60,
        seed=1,
        verbose=0,
    )
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], verbose=0
    )
    stepped = {
        name: model.get_log_l2()[name] - 0.5 * np.sign(g)
        for name, g in result.grads.items()
    }
    after = _hset_loss_after_fit(model, small_mnist, theta_0, stepped, 60, 1)
    assert after < result.hset_loss


def test_subclassed_model(small_mnist):
    class Net(drmad_keras.DrMADModel):
        def __init__(self):
            super().__init__()
            self.hidden = drmad_keras.HyperRegularizer(
                keras.layers.Dense(8, activation="tanh", name="hidden")
            )
            self.out = drmad_keras.HyperRegularizer(
                keras.layers.Dense(10, name="logits"), granularity="unit"
            )

        def call(self, x):
            return self.out(self.hidden(x))

    model = Net()
    model.compile(
        optimizer=drmad_keras.MomentumSGD(0.1, 0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        small_mnist["x_e"],
        small_mnist["y_e"],
        batch_size=20,
        steps=10,
        verbose=0,
    )
    result = model.hypergradient(
        small_mnist["x_h"], small_mnist["y_h"], verbose=0
    )
    assert set(result.grads) == {"log_l2_hidden", "log_l2_logits"}
    assert result.grads["log_l2_logits"].shape == (8,)
    assert np.all(np.isfinite(result.grads["log_l2_logits"]))
