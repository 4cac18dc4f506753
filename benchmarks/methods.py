"""drmad, exact and t1t2 side by side: tuning quality and cost.

    python benchmarks/methods.py            # the figures of RESULTS.md
    python benchmarks/methods.py --quick    # a smoke run, under two minutes

Each method runs the main job (`drmad_keras.train.run`, what
`bin/train_mnist` runs) on the paper MLP and the MNIST-sample splits of
each seed, for the same number of episodes from the same starting values:
`drmad` and `exact` tune `log_l2` by one reverse pass per episode, `t1t2`
tunes it online inside each run (a meta step every 10 elementary steps),
and the `all kinds` rows tune `log_l2`, `log_lr`, `logit_momentum` and
`log_init_scale` together. Reported per method, mean and standard
deviation over seeds: the HSet loss of the first episode (for `t1t2`: after
one run that tuned as it went; for the others: a plain run at the starting
values) and of the last, the best VSet error, the test error of the
VSet-best episode, episodes finished, and the median seconds per episode.
"""

import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from drmad_keras import options  # noqa: E402
from drmad_keras import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes: a smoke run.")
flags.DEFINE_integer("seeds", 3, "Seeds (splits, weights, batch order).")
flags.DEFINE_integer("episodes", 20, "Episodes per run.")
flags.DEFINE_string(
    "workdir", "/tmp/drmad_methods_bench", "Where the runs keep their files."
)

# (label, method, kinds tuned, meta learning rate)
METHODS = (
    ("drmad", "drmad", ("log_l2",), 0.2),
    ("exact", "exact", ("log_l2",), 0.2),
    ("t1t2", "t1t2", ("log_l2",), 0.02),
    ("drmad, all kinds", "drmad", options.KINDS, 0.2),
    ("exact, all kinds", "exact", options.KINDS, 0.2),
)


def run_one(label, method, tune, meta_lr, seed, base):
    """One main-job run; returns its figures (what finished, if it
    stopped early)."""
    out = os.path.join(FLAGS.workdir, f"{label.replace(', ', '_')}_{seed}")
    shutil.rmtree(out, ignore_errors=True)
    config = common.paper_config(
        method=method,
        tune=tune,
        meta_learning_rate=meta_lr,
        seed=seed,
        output_dir=out,
        **base,
    )
    try:
        results = train.run(config)
        stopped = None
    except RuntimeError as error:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        stopped = str(error).splitlines()[0]
    completed = [e for e in results["episodes"] if e["status"] == "COMPLETED"]
    row = {
        "label": label,
        "seed": seed,
        "episodes": len(completed),
        "failed": len(results["episodes"]) - len(completed),
        "stopped": stopped,
        "first_hset_loss": completed[0]["hset_loss"] if completed else None,
        "last_hset_loss": completed[-1]["hset_loss"] if completed else None,
        "seconds": statistics.median(e["seconds"] for e in completed[1:])
        if len(completed) > 1
        else None,
    }
    if "best" in results:
        row["best_val_error"] = results["best"]["val_error"]
        row["test_error"] = results["best"]["test_error"]
        row["first_test_error"] = results["first"]["test_error"]
        row["best"] = {
            kind: results["best"][kind]
            for kind in options.KINDS
            if results["best"].get(kind)
        }
    return row


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet()
    if FLAGS.quick:
        base = {"episodes": 3, "steps": 100, "hidden": (20,)}
        seeds = [0]
    else:
        base = {"episodes": FLAGS.episodes}
        seeds = list(range(FLAGS.seeds))

    rows = []
    for label, method, tune, meta_lr in METHODS:
        for seed in seeds:
            row = run_one(label, method, tune, meta_lr, seed, base)
            print(row)
            rows.append(row)

    table = []
    for label, *_ in METHODS:
        mine = [r for r in rows if r["label"] == label]
        table.append(
            [
                label,
                _mean_sd([r["first_hset_loss"] for r in mine]),
                _mean_sd([r["last_hset_loss"] for r in mine]),
                _mean_sd([r.get("best_val_error") for r in mine]),
                _mean_sd([r.get("test_error") for r in mine]),
                " / ".join(str(r["episodes"]) for r in mine),
                _mean_sd([r["seconds"] for r in mine]),
            ]
        )
    print(
        f"\nTuning log_l2 (and more) with each method, {len(seeds)} "
        f"seed(s), {base['episodes']} episodes, mean ± sd:\n"
    )
    print(
        common.table(
            [
                "method",
                "HSet loss, episode 0",
                "HSet loss, last",
                "best VSet error",
                "test error (VSet-best)",
                "episodes finished",
                "s / episode",
            ],
            table,
        )
    )
    stopped = [r for r in rows if r["stopped"]]
    for r in stopped:
        print(f"\n{r['label']} seed {r['seed']} stopped: {r['stopped']}")
    path = common.save("methods", {"quick": FLAGS.quick, "rows": rows})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    app.run(main)
