"""How close DrMAD's hypergradient is to the exact one.

    python benchmarks/accuracy.py            # the figures of RESULTS.md
    python benchmarks/accuracy.py --quick    # a smoke run, under two minutes

For each setting (learning rate, `T`, starting `log_l2`, granularity) one
run is trained with its trajectory stored; then the hypergradient of its
HSet loss is computed by `exact` (Hessian products at the stored weights)
and by `drmad` with each curvature and with `reverse_steps` of `T` and
`T/10`. Reported: the cosine with `exact`, and the ratio of norms.

A second table does the same per kind of hyperparameter (`log_l2`,
`log_lr`, `logit_momentum`, `log_init_scale`, all tuned at once, `drmad`
with its default curvature over all `T` steps), with one value per layer
or, in the schedule rows, per layer and block.

On the smallest setting, central finite differences (retraining at
`value +- eps`, float64) check `exact` itself for every kind.
"""

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import drmad_keras  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes: a smoke run.")


def _flat(grads):
    return np.concatenate([np.ravel(g) for g in grads.values()])


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run_and_exact(config, split, steps):
    """One run of `config` with its trajectory stored; returns the model,
    the HSet and the exact hypergradient (a dict by name)."""
    (x, y), (x_h, y_h) = split.eset, split.hset
    model = common.drmad_model(config)
    model.fit(
        x,
        y,
        batch_size=config.batch_size,
        steps=steps,
        record_trajectory=True,
        seed=config.seed,
        verbose=0,
    )
    exact = model.hypergradient(x_h, y_h, method="exact", verbose=0).grads
    return model, (x_h, y_h), exact


def compare(config, split, steps):
    """Cosine and norm ratio of every variant against `exact`."""
    model, (x_h, y_h), exact = _run_and_exact(config, split, steps)
    exact = _flat(exact)
    rows = []
    variants = itertools.product(
        ("gauss_newton", "hessian"), (steps, max(steps // 10, 1))
    )
    for curvature, reverse_steps in variants:
        try:
            result = model.hypergradient(
                x_h,
                y_h,
                method="drmad",
                curvature=curvature,
                reverse_steps=reverse_steps,
                max_growth=np.inf,
                verbose=0,
            )
            g = _flat(result.grads)
            cosine = _cos(g, exact)
            ratio = float(np.linalg.norm(g) / np.linalg.norm(exact))
            growth = result.growth
        except drmad_keras.DivergenceError:
            cosine = ratio = growth = float("nan")
        rows.append(
            {
                "curvature": curvature,
                "reverse_steps": reverse_steps,
                "cosine": cosine,
                "norm_ratio": ratio,
                "growth": growth,
            }
        )
    return {"exact_norm": float(np.linalg.norm(exact)), "variants": rows}


def compare_kinds(config, split, steps):
    """Cosine and norm ratio of `drmad` against `exact`, per kind."""
    model, (x_h, y_h), exact = _run_and_exact(config, split, steps)
    try:
        drmad = model.hypergradient(
            x_h, y_h, method="drmad", max_growth=np.inf, verbose=0
        ).grads
    except drmad_keras.DivergenceError:
        drmad = None
    found = {}
    for kind in config.tune:
        names = [n for n in exact if n.startswith(kind + "_")]
        e = np.concatenate([np.ravel(exact[n]) for n in names])
        if drmad is None:
            found[kind] = {"cosine": float("nan"), "norm_ratio": float("nan")}
            continue
        d = np.concatenate([np.ravel(drmad[n]) for n in names])
        found[kind] = {
            "cosine": _cos(d, e),
            "norm_ratio": float(np.linalg.norm(d) / np.linalg.norm(e)),
            "sign_agreement": float(np.mean(np.sign(d) == np.sign(e))),
        }
    return found


def finite_differences(config, split, steps, eps=1e-4):
    """`exact` against central differences, per hyperparameter, in
    float64."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        (x, y), (x_h, y_h) = split.eset, split.hset
        model = common.drmad_model(config)
        theta_0 = [v.numpy() for v in model.trainable_variables]
        model.fit(
            x,
            y,
            batch_size=config.batch_size,
            steps=steps,
            record_trajectory=True,
            verbose=0,
        )
        exact = model.hypergradient(x_h, y_h, method="exact", verbose=0)
        start = model.get_hyperparameters()

        def hset_loss(values):
            model.set_hyperparameters(values)
            for var, value in zip(model.trainable_variables, theta_0):
                var.assign(value)
            model.fit(
                x, y, batch_size=config.batch_size, steps=steps, verbose=0
            )
            return model.evaluate_split(x_h, y_h)[0]

        rows = []
        for name, value in start.items():
            plus = {**start, name: value + eps}
            minus = {**start, name: value - eps}
            fd = (hset_loss(plus) - hset_loss(minus)) / (2 * eps)
            got = float(np.ravel(exact.grads[name])[0])
            rows.append(
                {
                    "name": name,
                    "exact": got,
                    "fd": fd,
                    "relative_error": abs(got - fd) / abs(fd),
                }
            )
        return rows
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet()
    if FLAGS.quick:
        base = {"hidden": (20, 20)}
        grid = [(0.1, 50, -3.0, "layer"), (0.1, 50, -3.0, "unit")]
        fd_steps = 20
    else:
        base = {}
        grid = [
            (lr, steps, init, "layer")
            for lr, steps, init in itertools.product(
                (0.05, 0.1, 0.2), (250, 1000), (-5.0, -3.0)
            )
        ] + [(0.1, 1000, -3.0, "unit")]
        fd_steps = 250

    results = {"settings": [], "quick": FLAGS.quick}
    table = []
    for lr, steps, init, granularity in grid:
        config = common.paper_config(
            learning_rate=lr, init_log_l2=init, granularity=granularity, **base
        )
        split = common.splits(config)
        found = compare(config, split, steps)
        results["settings"].append(
            {
                "learning_rate": lr,
                "steps": steps,
                "init_log_l2": init,
                "granularity": granularity,
                **found,
            }
        )
        for row in found["variants"]:
            table.append(
                [
                    lr,
                    steps,
                    init,
                    granularity,
                    row["curvature"],
                    row["reverse_steps"],
                    f"{row['cosine']:.3f}",
                    f"{row['norm_ratio']:.3g}",
                    f"{row['growth']:.3g}",
                ]
            )
    print(
        "\nDrMAD against exact (cosine, norm ratio; growth is the largest "
        "norm ratio of the reverse state to its start):\n"
    )
    print(
        common.table(
            [
                "alpha",
                "T",
                "init log_l2",
                "granularity",
                "curvature",
                "reverse steps",
                "cosine",
                "norm ratio",
                "growth",
            ],
            table,
        )
    )

    # Every kind of hyperparameter, drmad against exact.
    if FLAGS.quick:
        kind_grid = [(0.1, 50, -3.0, "layer", 1), (0.1, 50, -3.0, "layer", 2)]
    else:
        kind_grid = [
            (lr, steps, init, "layer", 1)
            for lr, steps, init in itertools.product(
                (0.05, 0.1, 0.2), (250, 1000), (-5.0, -3.0)
            )
        ] + [
            (0.5, 1000, -3.0, "layer", 1),
            (0.1, 1000, -3.0, "layer", 4),
            (0.1, 1000, -3.0, "unit", 1),
        ]
    results["kinds"] = []
    kind_table = []
    for lr, steps, init, granularity, blocks in kind_grid:
        config = common.paper_config(
            learning_rate=lr,
            init_log_l2=init,
            granularity=granularity,
            tune=drmad_keras.options.KINDS,
            schedule_blocks=blocks,
            **base,
        )
        found = compare_kinds(config, common.splits(config), steps)
        results["kinds"].append(
            {
                "learning_rate": lr,
                "steps": steps,
                "init_log_l2": init,
                "granularity": granularity,
                "schedule_blocks": blocks,
                "kinds": found,
            }
        )
        kind_table.append(
            [lr, steps, init, granularity, blocks]
            + [
                f"{found[k]['cosine']:.3f} ({found[k]['norm_ratio']:.2g})"
                for k in drmad_keras.options.KINDS
            ]
        )
    print(
        "\ndrmad (gauss_newton, all T) against exact, per kind of "
        "hyperparameter: cosine (norm ratio)\n"
    )
    print(
        common.table(
            ["alpha", "T", "init log_l2", "granularity", "blocks"]
            + list(drmad_keras.options.KINDS),
            kind_table,
        )
    )

    config = common.paper_config(
        learning_rate=0.1,
        init_log_l2=-3.0,
        tune=drmad_keras.options.KINDS,
        **base,
    )
    fd = finite_differences(config, common.splits(config), fd_steps)
    results["finite_differences"] = fd
    print(
        f"\nexact against central differences (float64, T = {fd_steps}, "
        "eps 1e-4):\n"
    )
    print(
        common.table(
            ["hyperparameter", "exact", "finite differences", "relative error"],
            [
                [
                    r["name"],
                    f"{r['exact']:.6g}",
                    f"{r['fd']:.6g}",
                    f"{r['relative_error']:.2e}",
                ]
                for r in fd
            ],
        )
    )
    print(f"\nwritten to {common.save('accuracy', results)}")


if __name__ == "__main__":
    app.run(main)
