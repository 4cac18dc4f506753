"""DrMAD against random search and Bayesian optimization at equal time.

    python benchmarks/tuners.py            # the figures of RESULTS.md
    python benchmarks/tuners.py --quick    # a smoke run, under two minutes

Every method tunes the `log_l2` of the same MLP on the same MNIST-sample
splits, with the same elementary training (momentum SGD, `T` steps of batch
50 from the same kind of initialization), and gets the same wall-clock
budget per seed. Two regimes: one `log_l2` per layer, and one per input
unit (hundreds). keras-tuner's `RandomSearch` and `BayesianOptimization`
train with stock Keras `fit` and score a configuration by its VSet accuracy
after the last step; `DrMADTuner` runs chained episodes from
`log_l2 = init` and scores each episode by its VSet error. Reported per
method: best VSet error, test error of the VSet-best configuration, trials
run, and the budget in gradient-evaluation equivalents (a stock trial
counts `T`; a DrMAD episode counts `T` plus its reverse steps times their
measured cost relative to a forward step).
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import keras  # noqa: E402
import keras_tuner  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from drmad_keras import tuner as tuner_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes: a smoke run.")
flags.DEFINE_integer("seeds", 3, "Seeds per method and regime.")
flags.DEFINE_float("budget", 90.0, "Wall-clock seconds per search.")
flags.DEFINE_string(
    "workdir", "/tmp/drmad_tuner_bench", "Where the tuners keep their trials."
)

RANGE = (-8.0, -1.0)
METHODS = ("drmad", "random", "bayesian")


class Budget:
    """Stops a keras-tuner search once its wall-clock budget is spent, and
    records the best-so-far VSet error after each trial."""

    def start_budget(self, seconds, error_of):
        self.deadline = time.perf_counter() + seconds
        self.started = time.perf_counter()
        self.error_of = error_of
        self.curve = []

    def pre_create_trial(self):
        super().pre_create_trial()
        if time.perf_counter() > self.deadline:
            self.oracle.max_trials = len(self.oracle.trials)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        error = self.error_of(trial)
        if error is not None:
            best = min([error] + [e for _, e in self.curve])
            self.curve.append((time.perf_counter() - self.started, best))


class BudgetedDrMAD(Budget, tuner_lib.DrMADTuner):
    pass


class BudgetedRandom(Budget, keras_tuner.RandomSearch):
    pass


class BudgetedBayesian(Budget, keras_tuner.BayesianOptimization):
    pass


def _val_error_drmad(trial):
    if trial.metrics.exists("val_error"):
        return trial.metrics.get_last_value("val_error")
    return None


def _val_error_stock(trial):
    if trial.metrics.exists("val_accuracy"):
        return 1.0 - trial.metrics.get_last_value("val_accuracy")
    return None


def stock_build(config):
    """A keras-tuner build function: the stock model, `log_l2` from hp."""

    def build(hp):
        model = common.stock_model(config)
        for layer in model.layers:
            if not hasattr(layer, "hp_name"):
                continue
            shape = tuple(layer.log_l2.shape)
            if not shape:
                value = hp.Float(layer.hp_name, *RANGE)
            else:
                value = np.array(
                    [
                        hp.Float(f"{layer.hp_name}_{i}", *RANGE)
                        for i in range(shape[0])
                    ]
                )
            layer.log_l2.assign(np.broadcast_to(value, shape))
        return model

    return build


def run_method(method, config, split, steps, budget, seed, directory):
    """One budgeted search; returns its curve and its VSet-best test error."""
    shutil.rmtree(directory, ignore_errors=True)
    common_args = dict(directory=directory, project_name=method, overwrite=True)
    if method == "drmad":
        tuner = BudgetedDrMAD(
            lambda hp: common.drmad_model(config),
            max_trials=10**6,
            log_l2_range=RANGE,
            seed=seed,
            **common_args,
        )
        tuner.start_budget(budget, _val_error_drmad)
        tuner.search(
            *split.eset,
            hyper_data=split.hset,
            validation_data=split.vset,
            batch_size=50,
            steps=steps,
            verbose=0,
        )
    else:
        cls = BudgetedRandom if method == "random" else BudgetedBayesian
        tuner = cls(
            stock_build(config),
            max_trials=10**6,
            seed=seed,
            objective=keras_tuner.Objective("val_accuracy", "max"),
            **common_args,
        )
        tuner.start_budget(budget, _val_error_stock)
        x, y = split.eset
        train = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed)
            .repeat()
            .batch(50)
        )
        # One epoch of T steps: the score is the VSet accuracy at the end.
        tuner.search(
            train,
            epochs=1,
            steps_per_epoch=steps,
            validation_data=split.vset,
            verbose=0,
        )

    best = tuner.get_best_models(1)[0]
    x_t, y_t = split.test
    logits = best(x_t)
    test_error = float(np.mean(np.argmax(logits, -1) != y_t))
    trials = [
        t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"
    ]
    return {
        "curve": tuner.curve,
        "best_val_error": tuner.curve[-1][1],
        "test_error": test_error,
        "trials": len(trials),
    }


def reverse_cost(config, split, steps):
    """Seconds of a reverse step over seconds of a forward step."""
    model = common.drmad_model(config)
    (x, y), (x_h, y_h) = split.eset, split.hset
    model.fit(x, y, batch_size=50, steps=steps, verbose=0)
    model.hypergradient(x_h, y_h, verbose=0)
    forward = common.median_time(
        lambda: model.fit(x, y, batch_size=50, steps=steps, verbose=0), 3
    )
    backward = common.median_time(
        lambda: model.hypergradient(x_h, y_h, verbose=0), 3
    )
    return backward / forward


def plot(results, regime, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {
        "drmad": "tab:blue",
        "random": "tab:orange",
        "bayesian": "tab:green",
    }
    for method in METHODS:
        for k, run in enumerate(results[regime][method]):
            times, errors = zip(*run["curve"]) if run["curve"] else ([], [])
            ax.step(
                times,
                errors,
                where="post",
                color=colors[method],
                alpha=0.8,
                label=method if k == 0 else None,
            )
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("best VSet error so far")
    ax.set_title(f"log_l2 per {regime}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet()
    quick = FLAGS.quick
    seeds = 1 if quick else FLAGS.seeds
    budget = 5.0 if quick else FLAGS.budget
    steps = 80 if quick else 1000
    base = {"hidden": (20,)} if quick else {}

    results = {"budget": budget, "steps": steps, "quick": quick}
    for regime in ("layer", "unit"):
        config = common.paper_config(granularity=regime, **base)
        split = common.splits(config)
        results[f"reverse_cost_{regime}"] = reverse_cost(config, split, steps)
        results[regime] = {}
        for method in METHODS:
            runs = []
            for seed in range(seeds):
                keras.utils.set_random_seed(seed)
                runs.append(
                    run_method(
                        method,
                        config,
                        split,
                        steps,
                        budget,
                        seed,
                        os.path.join(FLAGS.workdir, regime, method, str(seed)),
                    )
                )
            results[regime][method] = runs

    rows = []
    for regime in ("layer", "unit"):
        cost = results[f"reverse_cost_{regime}"]
        for method in METHODS:
            runs = results[regime][method]
            per_trial = steps * (1 + cost) if method == "drmad" else steps
            trials = [r["trials"] for r in runs]
            val = [r["best_val_error"] for r in runs]
            test = [r["test_error"] for r in runs]
            rows.append(
                [
                    regime,
                    method,
                    f"{np.mean(trials):.1f}",
                    f"{np.mean(trials) * per_trial:,.0f}",
                    f"{np.mean(val):.4f} ± {np.std(val):.4f}",
                    f"{np.mean(test):.4f} ± {np.std(test):.4f}",
                ]
            )
    print(
        f"\n{seeds} seed(s), {budget:.0f} s per search, T = {steps}; "
        "mean ± standard deviation over seeds:\n"
    )
    print(
        common.table(
            [
                "log_l2 per",
                "method",
                "trials",
                "gradient evaluations",
                "best VSet error",
                "test error of VSet-best",
            ],
            rows,
        )
    )
    for regime in ("layer", "unit"):
        print(
            f"reverse step / forward step ({regime}): "
            f"{results[f'reverse_cost_{regime}']:.2f}"
        )
    out = FLAGS.out_dir
    os.makedirs(out, exist_ok=True)
    for regime in ("layer", "unit"):
        plot(results, regime, os.path.join(out, f"tuners_{regime}.png"))
    print(f"\nwritten to {common.save('tuners', results)}")


if __name__ == "__main__":
    app.run(main)
