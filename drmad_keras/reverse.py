"""Meta-forward and meta-backward as plain functions of tensors.

Everything here works on lists of tensors: `theta` (the elementary
parameters), `log_l2` (the hyperparameters) and an `Objective` that says how
to compute the model's outputs, its data loss and its penalty. No Keras
model object is needed, so the passes can be tested and benchmarked alone.

The recurrences are those of DESIGN.md: momentum SGD

    v     = gamma * v - (1 - gamma) * grad_theta L1(theta, lam; B_t)
    theta = theta + alpha * v

and its reverse

    d_v     += alpha * d_theta
    d_theta -= (1 - gamma) * H_tt d_v
    d_lam   -= (1 - gamma) * H_lt d_v
    d_v     *= gamma

walked from `t = T - 1` down, at the stored `theta_t` (`exact`) or at the
point `(1 - t/T) theta_0 + (t/T) theta_T` of the straight line (`drmad`).
"""

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from drmad_keras import options

METHODS = options.METHODS
CURVATURES = options.CURVATURES

# Steps run inside one compiled call; between calls the progress bar moves
# and the reverse pass checks for divergence.
CHUNK_STEPS = 100


class DivergenceError(FloatingPointError):
    """Training or a reverse pass produced non-finite or exploding values.

    Attributes:
        phase: str, `"meta-forward"` or `"meta-backward"`.
        step: int or None, the elementary step where it was seen.
    """

    def __init__(self, message, phase, step=None):
        super().__init__(message)
        self.phase = phase
        self.step = step


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """The training loss `L1` split into the parts the passes need.

    Attributes:
        output_fn: `(theta, x) -> z`, the model's outputs (logits).
        data_loss_fn: `(y, z) -> scalar`, the mean data loss (cross-entropy).
        penalty_fn: `(theta, log_l2) -> scalar`, the L2 penalty.
        strategy: `tf.distribute.Strategy` or None. When given, each
            elementary step and each reverse step splits its batch over the
            strategy's replicas and averages what they return.
    """

    output_fn: Callable
    data_loss_fn: Callable
    penalty_fn: Callable
    strategy: object = None

    def train_loss(self, theta, log_l2, x, y):
        """`L1(theta, lam; (x, y))`: data loss plus penalty."""
        z = self.output_fn(theta, x)
        return self.data_loss_fn(y, z) + self.penalty_fn(theta, log_l2)

    def data_loss(self, theta, x, y):
        """The plain data loss, as used on HSet."""
        return self.data_loss_fn(y, self.output_fn(theta, x))


def batch_order(num_examples, batch_size, steps, seed):
    """The ESet batch of every elementary step, as an index array.

    Each pass over the data is a fresh permutation drawn from `seed`; a
    partial last batch is dropped, so every step sees `batch_size` examples.

    Args:
        num_examples: int. Size of ESet.
        batch_size: int. Examples per step, at most `num_examples`.
        steps: int. Number of elementary steps `T`.
        seed: int. Seed of the permutations.

    Returns:
        An int32 array of shape `(steps, batch_size)`.
    """
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [
            rng.permutation(num_examples)[: per_epoch * batch_size]
            for _ in range(epochs)
        ]
    )
    return (
        order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)
    )


def _zeros_for_none(values, like):
    return [tf.zeros_like(w) if g is None else g for g, w in zip(values, like)]


def _global_norm(tensors):
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def gradient(objective, theta, log_l2, x, y):
    """Returns `(L1, grad_theta L1)` on one batch."""
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = objective.train_loss(theta, log_l2, x, y)
    return loss, _zeros_for_none(tape.gradient(loss, theta), theta)


def hset_gradient(objective, theta, x, y):
    """Returns `(l2, grad_theta l2)`: the HSet data loss and its gradient."""
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = objective.data_loss(theta, x, y)
    return loss, _zeros_for_none(tape.gradient(loss, theta), theta)


def _second_order_product(scalar_fn, theta, log_l2, d_v):
    """`(H_tt d_v, H_lt d_v)` of `scalar_fn(theta, log_l2)` by one
    double-backward pass."""
    with tf.GradientTape() as outer:
        outer.watch([theta, log_l2])
        with tf.GradientTape() as inner:
            inner.watch(theta)
            value = scalar_fn(theta, log_l2)
        grads = _zeros_for_none(inner.gradient(value, theta), theta)
    h_theta, h_lam = outer.gradient(
        grads, [theta, log_l2], output_gradients=d_v
    )
    return _zeros_for_none(h_theta, theta), _zeros_for_none(h_lam, log_l2)


def hessian_product(objective, theta, log_l2, x, y, d_v):
    """`(H_tt d_v, H_lt d_v)` of `L1` on the batch `(x, y)`."""
    return _second_order_product(
        lambda t, lam: objective.train_loss(t, lam, x, y), theta, log_l2, d_v
    )


def gauss_newton_product(objective, theta, log_l2, x, y, d_v):
    """Generalized Gauss-Newton product for the data term, exact penalty.

    The data term's curvature is replaced by `J^T H_z J`, with `J` the
    Jacobian of the outputs in `theta` and `H_z` the Hessian of the data loss
    in the outputs; it is positive semi-definite when the loss is convex in
    the outputs (cross-entropy on logits). The penalty's products are exact,
    and only the penalty depends on `lam`, so `H_lt d_v` is exact too.

    Returns:
        `(G d_v + H_pen d_v, H_lt d_v)`.
    """
    # Forward pass with a forward-mode tangent: z and J d_v.
    with tf.GradientTape() as tape:
        tape.watch(theta)
        with tf.autodiff.ForwardAccumulator(theta, d_v) as acc:
            z = objective.output_fn(theta, x)
        jv = acc.jvp(z)

    # H_z (J d_v), by double backward through the loss alone.
    z_leaf = tf.stop_gradient(z)
    with tf.GradientTape() as outer:
        outer.watch(z_leaf)
        with tf.GradientTape() as inner:
            inner.watch(z_leaf)
            loss = objective.data_loss_fn(y, z_leaf)
        grad_z = inner.gradient(loss, z_leaf)
    hjv = outer.gradient(grad_z, z_leaf, output_gradients=jv)

    # J^T H_z J d_v, then the penalty's exact share.
    ggn = _zeros_for_none(tape.gradient(z, theta, output_gradients=hjv), theta)
    pen_theta, pen_lam = _second_order_product(
        objective.penalty_fn, theta, log_l2, d_v
    )
    return [a + b for a, b in zip(ggn, pen_theta)], pen_lam


def on_replicas(objective, fn, theta, log_l2, x, y, *rest):
    """`fn(objective, theta, log_l2, x, y, *rest)`, data-parallel.

    Without a strategy this is the plain call. With one, the batch is split
    into equal shards, one per replica, and the replicas' results (means
    over their shards) are averaged, which equals the full-batch result.
    """
    strategy = objective.strategy
    if strategy is None:
        return fn(objective, theta, log_l2, x, y, *rest)
    replicas = strategy.num_replicas_in_sync
    xs, ys = tf.split(x, replicas), tf.split(y, replicas)
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            xs[ctx.replica_id_in_sync_group],
            ys[ctx.replica_id_in_sync_group],
        )
    )
    per_replica = strategy.run(
        lambda shard: fn(objective, theta, log_l2, shard[0], shard[1], *rest),
        args=(shards,),
    )
    return tf.nest.map_structure(
        lambda value: strategy.reduce(
            tf.distribute.ReduceOp.MEAN, value, axis=None
        ),
        per_replica,
    )


_PRODUCTS = {
    "hessian": hessian_product,
    "gauss_newton": gauss_newton_product,
}


def _forward_chunk(
    objective, theta, v, log_l2, x, y, index, alpha, gamma, record
):
    """Runs `len(index)` elementary steps; returns the new state."""
    steps = tf.shape(index)[0]
    losses = tf.TensorArray(x.dtype, size=steps)
    trajectory = (
        [tf.TensorArray(w.dtype, size=steps) for w in theta] if (record) else []
    )
    for i in tf.range(steps):
        if record:
            trajectory = [ta.write(i, w) for ta, w in zip(trajectory, theta)]
        xb = tf.gather(x, index[i])
        yb = tf.gather(y, index[i])
        loss, grads = on_replicas(objective, gradient, theta, log_l2, xb, yb)
        v = [gamma * vi - (1.0 - gamma) * g for vi, g in zip(v, grads)]
        theta = [w + alpha * vi for w, vi in zip(theta, v)]
        losses = losses.write(i, loss)
    return theta, v, losses.stack(), [ta.stack() for ta in trajectory]


def _reverse_chunk(
    objective,
    product,
    d_theta,
    d_v,
    d_lam,
    growth,
    log_l2,
    x,
    y,
    index,
    points,
    alpha,
    gamma,
):
    """Runs reverse steps over `index` (already in reverse order).

    `points` is either `("line", theta_0, theta_T, fractions)`, the weights
    being interpolated at each fraction `t / T`, or `("stored", trajectory)`
    with `trajectory[k][i]` the stored `theta_t` of variable `k`.
    """
    steps = tf.shape(index)[0]
    for i in tf.range(steps):
        if points[0] == "line":
            _, theta_0, theta_T, fractions = points
            s = tf.cast(fractions[i], theta_0[0].dtype)
            theta_t = [
                (1.0 - s) * w0 + s * wt for w0, wt in zip(theta_0, theta_T)
            ]
        else:
            theta_t = [traj[i] for traj in points[1]]
        xb = tf.gather(x, index[i])
        yb = tf.gather(y, index[i])

        d_v = [dv + alpha * dt for dv, dt in zip(d_v, d_theta)]
        h_theta, h_lam = on_replicas(
            objective, product, theta_t, log_l2, xb, yb, d_v
        )
        d_theta = [dt - (1.0 - gamma) * h for dt, h in zip(d_theta, h_theta)]
        d_lam = [dl - (1.0 - gamma) * h for dl, h in zip(d_lam, h_lam)]
        d_v = [gamma * dv for dv in d_v]
        growth = tf.maximum(growth, _global_norm(d_theta))
    return d_theta, d_v, d_lam, growth


_COMPILED = {}


def _compiled(fn, jit_compile):
    key = (fn, bool(jit_compile))
    if key not in _COMPILED:
        _COMPILED[key] = tf.function(
            fn, jit_compile=bool(jit_compile), reduce_retracing=True
        )
    return _COMPILED[key]


def _chunks(num_steps, chunk):
    return [(s, min(s + chunk, num_steps)) for s in range(0, num_steps, chunk)]


def meta_forward(
    objective,
    theta_0,
    log_l2,
    x,
    y,
    index,
    alpha,
    gamma,
    record_trajectory=False,
    jit_compile=False,
    progress=None,
):
    """Trains `theta` from `theta_0` by `len(index)` elementary steps.

    Args:
        objective: `Objective`.
        theta_0: list of tensors. Initial elementary parameters.
        log_l2: list of tensors. Hyperparameters, fixed during the run.
        x: tensor. ESet inputs.
        y: tensor. ESet labels.
        index: int array `(T, batch)`, from `batch_order`.
        alpha: float. Step size.
        gamma: float. Momentum.
        record_trajectory: bool, default False. Keep every `theta_t`,
            `t = 0 .. T-1` (memory `T * |theta|`), as `exact` needs.
        jit_compile: bool, default False. Compile the steps with XLA.
        progress: callable or None. Called with the number of steps done
            after each chunk.

    Returns:
        `(theta_T, losses, trajectory)`: the final parameters, the training
        loss of every step (NumPy), and the trajectory (a list of arrays
        `(T, ...)` per variable) or None.

    Raises:
        DivergenceError: If the parameters stop being finite.
    """
    run = _compiled(_forward_chunk, jit_compile)
    dtype = theta_0[0].dtype
    alpha = tf.constant(alpha, dtype)
    gamma = tf.constant(gamma, dtype)
    theta = list(theta_0)
    v = [tf.zeros_like(w) for w in theta]
    losses, pieces = [], []
    for start, stop in _chunks(len(index), CHUNK_STEPS):
        theta, v, chunk_losses, traj = run(
            objective,
            theta,
            v,
            log_l2,
            x,
            y,
            tf.constant(index[start:stop]),
            alpha,
            gamma,
            record_trajectory,
        )
        chunk_losses = chunk_losses.numpy()
        losses.append(chunk_losses)
        if record_trajectory:
            pieces.append(traj)
        if not np.all(np.isfinite(chunk_losses)):
            bad = start + int(np.argmin(np.isfinite(chunk_losses)))
            raise DivergenceError(
                f"training loss became non-finite at elementary step {bad} "
                f"of {len(index)}; lower the learning rate (alpha) or the "
                "L2 strength.",
                phase="meta-forward",
                step=bad,
            )
        if progress is not None:
            progress(stop)
    trajectory = None
    if record_trajectory:
        trajectory = [
            tf.concat([p[k] for p in pieces], axis=0) for k in range(len(theta))
        ]
    return theta, np.concatenate(losses), trajectory


def meta_backward(
    objective,
    theta_0,
    theta_T,
    log_l2,
    x,
    y,
    index,
    alpha,
    gamma,
    d_theta,
    method="drmad",
    curvature="gauss_newton",
    reverse_steps=None,
    trajectory=None,
    max_growth=1e6,
    jit_compile=False,
    progress=None,
):
    """The reverse pass: `d l2(theta_T) / d log_l2` from `d_theta`.

    Args:
        objective: `Objective`.
        theta_0: list of tensors. Initial parameters of the run.
        theta_T: list of tensors. Final parameters of the run.
        log_l2: list of tensors. Hyperparameters the run used.
        x: tensor. ESet inputs.
        y: tensor. ESet labels.
        index: int array `(T, batch)`: the run's batch order.
        alpha: float. Step size of the run.
        gamma: float. Momentum of the run.
        d_theta: list of tensors. `grad_theta l2(theta_T)`, from HSet.
        method: str, default `"drmad"`. `"drmad"` walks the straight line
            from `theta_T` back to `theta_0`; `"exact"` uses `trajectory`.
        curvature: str, default `"gauss_newton"`. `"hessian"` or
            `"gauss_newton"` (see `gauss_newton_product`).
        reverse_steps: int or None. Walk back only this many steps, the last
            ones of the run (`t = T-1` down to `T-reverse_steps`), each on
            the batch of its forward step; None means all `T`.
        trajectory: list of tensors `(T, ...)` or None. Needed by `exact`.
        max_growth: float, default 1e6. Largest allowed ratio of the norm of
            `d_theta` during the pass to its starting norm.
        jit_compile: bool, default False. Compile the steps with XLA.
        progress: callable or None. Called with the reverse steps done.

    Returns:
        `(d_log_l2, growth)`: a list of NumPy arrays shaped like `log_l2`,
        and the largest norm ratio seen.

    Raises:
        ValueError: For an unknown method or curvature, a missing
            trajectory, or `reverse_steps` out of range.
        DivergenceError: If the pass produces non-finite values or its
            norm grows past `max_growth`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature must be one of {CURVATURES}; got {curvature!r}."
        )
    num_steps = len(index)
    if reverse_steps is None:
        reverse_steps = num_steps
    if not 1 <= reverse_steps <= num_steps:
        raise ValueError(
            f"reverse_steps must be between 1 and the {num_steps} steps of "
            f"the run; got {reverse_steps}."
        )
    if method == "exact" and trajectory is None:
        raise ValueError(
            "method='exact' needs the stored trajectory: run fit(..., "
            "record_trajectory=True) first, or use method='drmad'."
        )

    run = _compiled(_reverse_chunk, jit_compile)
    product = _PRODUCTS[curvature]
    dtype = theta_0[0].dtype
    alpha_t = tf.constant(alpha, dtype)
    gamma_t = tf.constant(gamma, dtype)
    d_theta = list(d_theta)
    d_v = [tf.zeros_like(w) for w in theta_0]
    d_lam = [tf.zeros_like(lam) for lam in log_l2]
    start_norm = float(_global_norm(d_theta))
    growth = tf.constant(start_norm, dtype)

    # Forward step numbers, last first.
    order = np.arange(num_steps - 1, num_steps - reverse_steps - 1, -1)
    for start, stop in _chunks(reverse_steps, CHUNK_STEPS):
        steps = order[start:stop]
        if method == "drmad":
            points = (
                "line",
                theta_0,
                theta_T,
                tf.constant(steps / num_steps, dtype),
            )
        else:
            points = ("stored", [tf.gather(traj, steps) for traj in trajectory])
        d_theta, d_v, d_lam, growth = run(
            objective,
            product,
            d_theta,
            d_v,
            d_lam,
            growth,
            log_l2,
            x,
            y,
            tf.constant(index[steps]),
            points,
            alpha_t,
            gamma_t,
        )
        ratio = float(growth) / max(start_norm, np.finfo(np.float64).tiny)
        finite = all(
            bool(tf.reduce_all(tf.math.is_finite(t))) for t in d_lam + d_theta
        )
        if not finite or ratio > max_growth:
            what = (
                "non-finite values"
                if not finite
                else (
                    f"a norm {ratio:.3g} times its start (limit {max_growth:g})"
                )
            )
            raise DivergenceError(
                f"the {method} reverse pass ({curvature}) produced {what} "
                f"within reverse steps {start}..{stop - 1} (forward steps "
                f"{steps[0]}..{steps[-1]}); the hypergradient is unusable. "
                + (
                    "Try curvature='gauss_newton', fewer reverse_steps or a "
                    "smaller learning rate."
                    if curvature == "hessian"
                    else "Try fewer reverse_steps or a smaller learning rate."
                ),
                phase="meta-backward",
                step=int(steps[-1]),
            )
        if progress is not None:
            progress(stop)
    ratio = float(growth) / max(start_norm, np.finfo(np.float64).tiny)
    return [d.numpy() for d in d_lam], ratio
