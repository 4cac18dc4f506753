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

The step size and the momentum may differ per variable and per block of
steps (a schedule): `alpha` and `gamma` are then tables of shape
`(blocks, num_variables)`, block `b` covering the steps `t` with
`t * blocks // T == b`, and the scalar factors above act per variable. Their
own hypergradients come from two more terms of the reverse step,

    d_alpha[t] += d_theta . v_{t+1}             (before d_theta -= ...)
    d_gamma[t] += d_v . (v_t + g_t)             (after it)

with `g_t` the gradient of `L1` at `theta_t` on `B_t`, recomputed. `exact`
gets the velocities from the stored trajectory: `v_{t+1} = (theta_{t+1} -
theta_t) / alpha_t` and `v_t = (v_{t+1} + (1 - gamma_t) g_t) / gamma_t`.
`drmad` stores no velocity, so it takes the velocity of the straight line
itself: every step moves by the same share of `theta_T - theta_0`, so
`v_t = (theta_T - theta_0) / sum_t alpha_t` for every `t > 0` (and `v_0 =
0`), and the line is walked at `sum_{s<t} alpha_s / sum_s alpha_s` instead
of `t / T` (the same when `alpha` is constant). The mean velocity ignores
how the velocity turns and settles along the run, which is why these two
hypergradients are much less reliable than those of `log_l2`: measure
before trusting them (benchmarks/accuracy.py).

After a full reverse pass `d_theta` is the derivative in `theta_0`, which
gives the hypergradient of a scale of the initial weights.
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
    `BatchOrder` gives the same rows a stretch at a time.

    Args:
        num_examples: int. Size of ESet.
        batch_size: int. Examples per step, at most `num_examples`.
        steps: int. Number of elementary steps `T`.
        seed: int. Seed of the permutations.

    Returns:
        An int32 array of shape `(steps, batch_size)`.
    """
    return BatchOrder(num_examples, batch_size, steps, seed).rows(0, steps)


class BatchOrder:
    """`batch_order(...)`, generated a stretch at a time.

    Indexing (`order[start:stop]`, `order[steps]` with an int array,
    `order[t]`) returns the same rows as the whole array would, but only
    the permutations of the passes over the data that those rows fall in
    are drawn: memory does not grow with `T`. The random generator's state
    at the start of each pass is kept (a few hundred bytes per pass), so
    that any stretch is regenerated without drawing the passes before it.

    Args:
        num_examples: int. Size of ESet.
        batch_size: int. Examples per step, at most `num_examples`.
        steps: int. Number of elementary steps `T`.
        seed: int. Seed of the permutations.
    """

    def __init__(self, num_examples, batch_size, steps, seed):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.steps = steps
        self.per_epoch = num_examples // batch_size
        self._rng = np.random.default_rng(seed)
        self._states = [self._rng.bit_generator.state]

    def __len__(self):
        return self.steps

    def _epochs(self, first, last):
        """The permutations of passes `first..last`, cut to whole
        batches."""
        while len(self._states) <= first:
            self._rng.bit_generator.state = self._states[-1]
            self._rng.permutation(self.num_examples)
            self._states.append(self._rng.bit_generator.state)
        self._rng.bit_generator.state = self._states[first]
        keep = self.per_epoch * self.batch_size
        return np.concatenate(
            [
                self._rng.permutation(self.num_examples)[:keep]
                for _ in range(first, last + 1)
            ]
        )

    def rows(self, start, stop):
        """Rows `start..stop-1`: an int32 array `(stop - start, batch)`."""
        if not 0 <= start < stop <= self.steps:
            raise IndexError(
                f"steps {start}..{stop - 1} are outside 0..{self.steps - 1}."
            )
        first = start // self.per_epoch
        last = (stop - 1) // self.per_epoch
        order = self._epochs(first, last).reshape(-1, self.batch_size)
        offset = start - first * self.per_epoch
        return order[offset : offset + stop - start].astype(np.int32)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, stride = key.indices(self.steps)
            if stride != 1:
                raise IndexError("BatchOrder takes slices with step 1.")
            if start >= stop:
                return np.zeros((0, self.batch_size), np.int32)
            return self.rows(start, stop)
        steps = np.asarray(key)
        if steps.ndim == 0:
            return self.rows(int(steps), int(steps) + 1)[0]
        low = int(steps.min())
        return self.rows(low, int(steps.max()) + 1)[steps - low]

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.steps)
        return whole if dtype is None else whole.astype(dtype)


def schedule_table(value, num_variables, name):
    """A step size or momentum as a `(blocks, num_variables)` table.

    Args:
        value: float, or array of shape `(blocks, num_variables)`.
        num_variables: int. Number of elementary parameter tensors.
        name: str. Named in errors.

    Returns:
        A float64 NumPy array `(blocks, num_variables)`.

    Raises:
        ValueError: For another shape or non-finite values.
    """
    table = np.asarray(value, dtype=np.float64)
    if table.ndim == 0:
        table = np.full((1, num_variables), float(table))
    if table.ndim != 2 or table.shape[1] != num_variables or not len(table):
        raise ValueError(
            f"{name} must be a number or a table of shape (blocks, "
            f"{num_variables}); got shape {table.shape}."
        )
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{name} must be finite; got {table}.")
    return table


def block_of(steps, num_steps, blocks):
    """The schedule block of each forward step in `steps`: `blocks` equal
    stretches of the `num_steps` steps, the first ones shortest."""
    if not 1 <= blocks <= num_steps:
        raise ValueError(
            f"a schedule of {blocks} blocks needs between 1 and {num_steps} "
            "blocks, one step at least in each."
        )
    return (np.asarray(steps, np.int64) * blocks // num_steps).astype(np.int32)


def _block_starts(num_steps, blocks):
    # First step t of each block b: the least t with t * blocks >= b * T.
    return np.array(
        [-(-b * num_steps // blocks) for b in range(blocks + 1)], np.int64
    )


def line_fractions(steps, num_steps, alpha):
    """Where each of `steps` lies on the straight line, per variable.

    Step `t` of the run sits at `sum_{s<t} alpha_s / sum_s alpha_s` of the
    way from `theta_0` to `theta_T`: each step moves by its step size.

    Args:
        steps: int array. Forward step numbers.
        num_steps: int. `T`.
        alpha: array `(blocks, num_variables)`, from `schedule_table`.

    Returns:
        A float64 array `(len(steps), num_variables)`.
    """
    steps = np.asarray(steps, np.int64)
    if len(alpha) == 1:
        # One block: the fraction is t / T for every variable.
        return np.repeat((steps / num_steps)[:, None], alpha.shape[1], 1)
    starts = _block_starts(num_steps, len(alpha))
    covered = np.concatenate(
        [
            np.zeros((1, alpha.shape[1])),
            np.cumsum(np.diff(starts)[:, None] * alpha, 0),
        ]
    )
    block = block_of(steps, num_steps, len(alpha))
    position = covered[block] + (steps - starts[block])[:, None] * alpha[block]
    return position / covered[-1]


def line_velocity(theta_0, theta_T, num_steps, alpha):
    """The velocity of the straight line: `(theta_T - theta_0) / sum_t
    alpha_t`, per variable; what `drmad` uses for every `v_t`, `t > 0`."""
    starts = _block_starts(num_steps, len(alpha))
    total = np.sum(np.diff(starts)[:, None] * alpha, 0)
    return [
        (wt - w0) / tf.cast(total[k], w0.dtype)
        for k, (w0, wt) in enumerate(zip(theta_0, theta_T))
    ]


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
    objective, theta, v, log_l2, x, y, index, block, alpha, gamma, record
):
    """Runs `len(index)` elementary steps; returns the new state.

    `alpha` and `gamma` are `(blocks, num_variables)` tables and `block[i]`
    the row that step `i` uses.
    """
    steps = tf.shape(index)[0]
    losses = tf.TensorArray(x.dtype, size=steps)
    trajectory = (
        [tf.TensorArray(w.dtype, size=steps) for w in theta] if (record) else []
    )
    for i in tf.range(steps):
        if record:
            trajectory = [ta.write(i, w) for ta, w in zip(trajectory, theta)]
        a, g = alpha[block[i]], gamma[block[i]]
        xb = tf.gather(x, index[i])
        yb = tf.gather(y, index[i])
        loss, grads = on_replicas(objective, gradient, theta, log_l2, xb, yb)
        v = [
            g[k] * vk - (1.0 - g[k]) * gk
            for k, (vk, gk) in enumerate(zip(v, grads))
        ]
        theta = [w + a[k] * vk for k, (w, vk) in enumerate(zip(theta, v))]
        losses = losses.write(i, loss)
    return theta, v, losses.stack(), [ta.stack() for ta in trajectory]


def _row_add(table, row, values):
    """`table[row] += values` for a `(blocks, n)` tensor."""
    return tf.tensor_scatter_nd_add(
        table, [[row]], tf.expand_dims(tf.stack(values), 0)
    )


def _dot(a, b):
    return tf.reduce_sum(a * b)


def _reverse_chunk(
    objective,
    product,
    state,
    log_l2,
    x,
    y,
    index,
    step_numbers,
    block,
    points,
    alpha,
    gamma,
    optimizer_terms,
):
    """Runs reverse steps over `index` (already in reverse order).

    `state` is `(d_theta, d_v, d_lam, d_alpha, d_gamma, theta_next,
    growth)`, `theta_next` being the weights after the step about to be
    reversed. `points` is either `("line", theta_0, theta_T, fractions,
    velocity)`, the weights being interpolated at `fractions[i]` (one per
    variable) and every velocity after step 0 taken as `velocity`, or
    `("stored", trajectory)` with `trajectory[k][i]` the stored `theta_t`
    of variable `k`. `optimizer_terms` adds the step-size and momentum
    hypergradients (one more gradient per step).
    """
    d_theta, d_v, d_lam, d_alpha, d_gamma, theta_next, growth = state
    steps = tf.shape(index)[0]
    if points[0] == "line":
        _, theta_0, theta_T, fractions, velocity = points
    for i in tf.range(steps):
        b = block[i]
        a, g = alpha[b], gamma[b]
        if points[0] == "line":
            s = tf.cast(fractions[i], theta_0[0].dtype)
            theta_t = [
                w0 + s[k] * (wt - w0)
                for k, (w0, wt) in enumerate(zip(theta_0, theta_T))
            ]
        else:
            theta_t = [traj[i] for traj in points[1]]
        xb = tf.gather(x, index[i])
        yb = tf.gather(y, index[i])

        d_v = [dv + a[k] * dt for k, (dv, dt) in enumerate(zip(d_v, d_theta))]
        if optimizer_terms:
            # v_{t+1}: the line's own, or the stored step over alpha; then
            # v_t from the recurrence (v_0 = 0).
            first = tf.cast(step_numbers[i] > 0, a.dtype)
            _, grads = on_replicas(objective, gradient, theta_t, log_l2, xb, yb)
            if points[0] == "line":
                v_next = velocity
                v_t = [first * vn for vn in v_next]
            else:
                v_next = [
                    (wn - w) / a[k]
                    for k, (wn, w) in enumerate(zip(theta_next, theta_t))
                ]
                v_t = [
                    first
                    * (vn + (1.0 - g[k]) * gk)
                    / tf.maximum(g[k], tf.constant(1e-30, g.dtype))
                    for k, (vn, gk) in enumerate(zip(v_next, grads))
                ]
            d_alpha = _row_add(
                d_alpha, b, [_dot(dt, vn) for dt, vn in zip(d_theta, v_next)]
            )
            d_gamma = _row_add(
                d_gamma,
                b,
                [_dot(dv, vt + gk) for dv, vt, gk in zip(d_v, v_t, grads)],
            )
        w = [(1.0 - g[k]) * dv for k, dv in enumerate(d_v)]
        h_theta, h_lam = on_replicas(
            objective, product, theta_t, log_l2, xb, yb, w
        )
        d_theta = [dt - h for dt, h in zip(d_theta, h_theta)]
        d_lam = [dl - h for dl, h in zip(d_lam, h_lam)]
        d_v = [g[k] * dv for k, dv in enumerate(d_v)]
        theta_next = theta_t
        growth = tf.maximum(growth, _global_norm(d_theta))
    return d_theta, d_v, d_lam, d_alpha, d_gamma, theta_next, growth


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


def _forward_stretch(
    run,
    objective,
    state,
    log_l2,
    x,
    y,
    index,
    blocks,
    start,
    stop,
    alpha,
    gamma,
    record,
    advice,
):
    """Steps `start..stop-1` through the compiled `_forward_chunk`; returns
    `(theta, v, losses as NumPy, trajectory)`.

    Raises:
        DivergenceError: If a training loss is not finite; `advice` says
            what to lower.
    """
    theta, v = state
    theta, v, losses, traj = run(
        objective,
        theta,
        v,
        log_l2,
        x,
        y,
        tf.constant(index[start:stop]),
        tf.constant(blocks[start:stop]),
        alpha,
        gamma,
        record,
    )
    losses = losses.numpy()
    if not np.all(np.isfinite(losses)):
        bad = start + int(np.argmin(np.isfinite(losses)))
        raise DivergenceError(
            f"training loss became non-finite at elementary step {bad} "
            f"of {len(index)}; lower {advice}.",
            phase="meta-forward",
            step=bad,
        )
    return theta, v, losses, traj


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
        index: int array `(T, batch)` or `BatchOrder`: the batch order.
        alpha: float or array `(blocks, num_variables)`. Step size, per
            variable and schedule block (see `schedule_table`).
        gamma: float or array `(blocks, num_variables)`. Momentum.
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
    alpha = schedule_table(alpha, len(theta_0), "alpha")
    gamma = schedule_table(gamma, len(theta_0), "gamma")
    if len(alpha) != len(gamma):
        raise ValueError(
            f"alpha has {len(alpha)} schedule blocks and gamma {len(gamma)}."
        )
    blocks = block_of(np.arange(len(index)), len(index), len(alpha))
    alpha, gamma = tf.constant(alpha, dtype), tf.constant(gamma, dtype)
    theta = list(theta_0)
    v = [tf.zeros_like(w) for w in theta]
    losses, pieces = [], []
    for start, stop in _chunks(len(index), CHUNK_STEPS):
        theta, v, chunk_losses, traj = _forward_stretch(
            run,
            objective,
            (theta, v),
            log_l2,
            x,
            y,
            index,
            blocks,
            start,
            stop,
            alpha,
            gamma,
            record_trajectory,
            "the step size (alpha, or the tuned log_lr), the L2 strength "
            "or the tuned initial scale",
        )
        losses.append(chunk_losses)
        if record_trajectory:
            pieces.append(traj)
        if progress is not None:
            progress(stop)
    trajectory = None
    if record_trajectory:
        trajectory = [
            tf.concat([p[k] for p in pieces], axis=0) for k in range(len(theta))
        ]
    return theta, np.concatenate(losses), trajectory


@dataclasses.dataclass
class Backward:
    """What `meta_backward` returns.

    Attributes:
        d_log_l2: list of NumPy arrays shaped like `log_l2`.
        growth: float. Largest ratio of the norm of `d_theta` during the
            pass to its starting norm.
        d_alpha: NumPy array `(blocks, num_variables)` or None. Derivative
            in each entry of the step-size table.
        d_gamma: NumPy array `(blocks, num_variables)` or None. Derivative
            in each entry of the momentum table.
        d_theta_0: list of NumPy arrays or None. Derivative in the initial
            parameters, after a full reverse pass only.
    """

    d_log_l2: list
    growth: float
    d_alpha: np.ndarray = None
    d_gamma: np.ndarray = None
    d_theta_0: list = None


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
    optimizer_terms=False,
):
    """The reverse pass: `d l2(theta_T) / d log_l2` from `d_theta`.

    Args:
        objective: `Objective`.
        theta_0: list of tensors. Initial parameters of the run.
        theta_T: list of tensors. Final parameters of the run.
        log_l2: list of tensors. Hyperparameters the run used.
        x: tensor. ESet inputs.
        y: tensor. ESet labels.
        index: int array `(T, batch)` or `BatchOrder`: the run's batch
            order.
        alpha: float or array `(blocks, num_variables)`. Step size of the
            run.
        gamma: float or array `(blocks, num_variables)`. Momentum of the
            run.
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
        optimizer_terms: bool, default False. Also return the derivatives
            in `alpha` and `gamma` (costs one more gradient per step).

    Returns:
        A `Backward`.

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
    alpha = schedule_table(alpha, len(theta_0), "alpha")
    gamma = schedule_table(gamma, len(theta_0), "gamma")
    velocity = (
        line_velocity(theta_0, theta_T, num_steps, alpha)
        if method == "drmad" and optimizer_terms
        else None
    )
    alpha_t, gamma_t = tf.constant(alpha, dtype), tf.constant(gamma, dtype)
    d_theta = list(d_theta)
    start_norm = float(_global_norm(d_theta))
    state = (
        d_theta,
        [tf.zeros_like(w) for w in theta_0],
        [tf.zeros_like(lam) for lam in log_l2],
        tf.zeros(alpha.shape, dtype),
        tf.zeros(gamma.shape, dtype),
        list(theta_T),
        tf.constant(start_norm, dtype),
    )

    # Forward step numbers, last first.
    order = np.arange(num_steps - 1, num_steps - reverse_steps - 1, -1)
    for start, stop in _chunks(reverse_steps, CHUNK_STEPS):
        steps = order[start:stop]
        if method == "drmad":
            fractions = line_fractions(steps, num_steps, alpha)
            points = (
                "line",
                theta_0,
                theta_T,
                tf.constant(fractions, dtype),
                velocity,
            )
        else:
            points = ("stored", [tf.gather(traj, steps) for traj in trajectory])
        state = run(
            objective,
            product,
            state,
            log_l2,
            x,
            y,
            tf.constant(index[steps]),
            tf.constant(steps),
            tf.constant(block_of(steps, num_steps, len(alpha))),
            points,
            alpha_t,
            gamma_t,
            bool(optimizer_terms),
        )
        d_theta, _, d_lam, d_alpha, d_gamma, _, growth = state
        ratio = float(growth) / max(start_norm, np.finfo(np.float64).tiny)
        finite = all(
            bool(tf.reduce_all(tf.math.is_finite(t)))
            for t in d_lam + d_theta + [d_alpha, d_gamma]
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
    return Backward(
        d_log_l2=[d.numpy() for d in d_lam],
        growth=ratio,
        d_alpha=d_alpha.numpy() if optimizer_terms else None,
        d_gamma=d_gamma.numpy() if optimizer_terms else None,
        d_theta_0=(
            [d.numpy() for d in d_theta] if reverse_steps == num_steps else None
        ),
    )


def one_step_hypergradient(
    objective, theta_next, v_next, log_l2, alpha, gamma, x_h, y_h
):
    """T1-T2's hypergradient: through the last elementary step only.

    The step `theta_{t+1} = theta_t + alpha v_{t+1}`, `v_{t+1} = gamma v_t -
    (1 - gamma) grad_theta L1(theta_t)` depends on `lam` only through the
    gradient, and of the gradient only the penalty's share, so

        d l2(theta_{t+1}) / d lam = -alpha (1 - gamma) H_lt(theta_t) d

    with `d = grad_theta l2(theta_{t+1})` on the HSet batch `(x_h, y_h)` and
    `theta_t = theta_{t+1} - alpha v_{t+1}`. Earlier steps are ignored: the
    method's greedy approximation.

    Returns:
        `(l2 on the batch, d l2 / d log_l2 as a list of tensors)`.
    """
    loss, d = hset_gradient(objective, theta_next, x_h, y_h)
    theta_t = [w - alpha * vk for w, vk in zip(theta_next, v_next)]
    w = [alpha * (1.0 - gamma) * dk for dk in d]
    _, h_lam = _second_order_product(objective.penalty_fn, theta_t, log_l2, w)
    return loss, [-h for h in h_lam]


def t1t2_run(
    objective,
    theta_0,
    log_l2,
    x,
    y,
    index,
    alpha,
    gamma,
    x_h,
    y_h,
    hyper_index,
    interval,
    meta_step,
    jit_compile=False,
    progress=None,
):
    """One training run that tunes `log_l2` online (T1-T2).

    Every `interval` elementary steps on ESet, one meta step on `log_l2`
    from `one_step_hypergradient` on the next HSet batch; the remaining
    steps use the new values.

    Args:
        objective: `Objective`.
        theta_0: list of tensors. Initial parameters.
        log_l2: list of tensors. Starting hyperparameters.
        x: tensor. ESet inputs.
        y: tensor. ESet labels.
        index: int array `(T, batch)` or `BatchOrder`. ESet batch order.
        alpha: float. Step size.
        gamma: float. Momentum.
        x_h: tensor. HSet inputs.
        y_h: tensor. HSet labels.
        hyper_index: int array `(meta_steps, batch)` or `BatchOrder`. HSet
            batch order, one row per meta step (`ceil(T / interval)` rows).
        interval: int. Elementary steps between meta steps.
        meta_step: callable. `(log_l2, grads) -> new log_l2`, lists of
            NumPy arrays.
        jit_compile: bool, default False.
        progress: callable or None. Called with the steps done.

    Returns:
        `(theta_T, log_l2, losses, hset_losses, grads)`: the final
        parameters and hyperparameters (tensors), the training loss of
        every elementary step, the HSet batch loss and the hypergradient
        (list of arrays) of every meta step.

    Raises:
        DivergenceError: If training or a hypergradient stops being finite.
    """
    forward = _compiled(_forward_chunk, jit_compile)
    hyper = _compiled(one_step_hypergradient, jit_compile)
    dtype = theta_0[0].dtype
    table = tf.constant(schedule_table(alpha, len(theta_0), "alpha"), dtype)
    momentum = tf.constant(schedule_table(gamma, len(theta_0), "gamma"), dtype)
    alpha_t, gamma_t = tf.constant(alpha, dtype), tf.constant(gamma, dtype)
    theta = list(theta_0)
    v = [tf.zeros_like(w) for w in theta]
    log_l2 = list(log_l2)
    blocks = np.zeros(len(index), np.int32)  # one block: no schedule
    losses, hset_losses, grads = [], [], []
    for j, (start, stop) in enumerate(_chunks(len(index), interval)):
        theta, v, chunk_losses, _ = _forward_stretch(
            forward,
            objective,
            (theta, v),
            log_l2,
            x,
            y,
            index,
            blocks,
            start,
            stop,
            table,
            momentum,
            False,
            "the learning rate (alpha), the L2 strength or the meta "
            "learning rate",
        )
        losses.append(chunk_losses)

        # One meta step from the one-step hypergradient on an HSet batch.
        rows = hyper_index[j]
        hset_loss, grad = hyper(
            objective,
            theta,
            v,
            log_l2,
            alpha_t,
            gamma_t,
            tf.gather(x_h, rows),
            tf.gather(y_h, rows),
        )
        grad = [g.numpy() for g in grad]
        if not all(np.all(np.isfinite(g)) for g in grad):
            raise DivergenceError(
                f"the one-step hypergradient after elementary step {stop - 1} "
                "is not finite.",
                phase="meta-backward",
                step=stop - 1,
            )
        hset_losses.append(float(hset_loss))
        grads.append(grad)
        new = meta_step([lam.numpy() for lam in log_l2], grad)
        log_l2 = [tf.constant(a, lam.dtype) for a, lam in zip(new, log_l2)]
        if progress is not None:
            progress(stop)
    return theta, log_l2, np.concatenate(losses), hset_losses, grads
