"""What a hypergradient costs, measured side by side in one run.

    python benchmarks/cost.py            # the figures of RESULTS.md
    python benchmarks/cost.py --quick    # a smoke run, under two minutes

1. Elementary steps per second: `DrMADModel.fit` against stock Keras `fit`
   (default `compile`, and `steps_per_execution=50`) with Keras' own SGD
   with momentum, on the same network, data and batch size.
2. One episode (meta-forward plus meta-backward) per method, against a
   stock Keras `fit` of the same `T` steps.
3. Peak extra memory of a run plus its meta-backward, for `exact` and
   `drmad`, at several `T`, each in a fresh process: the peak resident set
   size, sampled every millisecond, above its level before the run.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes: a smoke run.")
flags.DEFINE_string("probe", None, "Internal: 'method,T' memory probe.")

METHODS = [
    ("drmad", "gauss_newton"),
    ("drmad", "hessian"),
    ("exact", "hessian"),
]


def stock_fit_seconds(config, x, y, steps, repeats, **compile_changes):
    """Median seconds of a stock Keras `fit` of `steps` steps (whole
    epochs), after a warm-up epoch."""
    epochs = steps // (len(x) // config.batch_size)
    stock = common.stock_model(config, **compile_changes)
    stock.fit(x, y, batch_size=config.batch_size, epochs=1, verbose=0)
    return common.median_time(
        lambda: stock.fit(
            x, y, batch_size=config.batch_size, epochs=epochs, verbose=0
        ),
        repeats,
    )


def steps_per_second(config, x, y, steps, repeats):
    """Elementary steps per second of each way of training."""
    rates = {}
    model = common.drmad_model(config)
    model.fit(x, y, batch_size=config.batch_size, steps=50, verbose=0)
    seconds = common.median_time(
        lambda: model.fit(
            x, y, batch_size=config.batch_size, steps=steps, verbose=0
        ),
        repeats,
    )
    rates["DrMADModel.fit"] = steps / seconds

    for name, changes in [
        ("stock fit", {}),
        ("stock fit, steps_per_execution=50", {"steps_per_execution": 50}),
    ]:
        seconds = stock_fit_seconds(config, x, y, steps, repeats, **changes)
        rates[name] = steps / seconds
    return rates


def episode_seconds(config, split, steps, repeats):
    """Seconds of one episode per method, and of a stock fit of T steps."""
    (x, y), (x_h, y_h) = split.eset, split.hset
    out = {}
    for method, curvature in METHODS:
        model = common.drmad_model(config)

        def episode(length=steps):
            model.fit(
                x,
                y,
                batch_size=config.batch_size,
                steps=length,
                record_trajectory=method == "exact",
                verbose=0,
            )
            model.hypergradient(
                x_h,
                y_h,
                method=method,
                curvature=curvature,
                max_growth=np.inf,
                verbose=0,
            )

        episode(2)  # Warm-up: traces the compiled loops.
        out[f"{method}/{curvature}"] = common.median_time(episode, repeats)
    out["stock fit"] = stock_fit_seconds(config, x, y, steps, repeats)
    return out


class _PeakRss:
    """Samples this process's resident set size every millisecond."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def memory_probe(method, steps):
    """Run in a fresh process: peak extra bytes (resident set size above
    its level before the run) of one run of T steps and its meta-backward,
    and the bytes of parameters the run record holds."""
    config = common.paper_config()
    split = common.splits(config)
    (x, y), (x_h, y_h) = split.eset, split.hset
    model = common.drmad_model(config)
    record = method == "exact"
    # Warm-up: trace every function, on whole and partial chunks.
    model.fit(
        x, y, batch_size=50, steps=150, record_trajectory=record, verbose=0
    )
    model.hypergradient(x_h, y_h, method=method, verbose=0)
    model.last_run = None
    with _PeakRss() as rss:
        model.fit(
            x,
            y,
            batch_size=50,
            steps=steps,
            record_trajectory=record,
            verbose=0,
        )
        model.hypergradient(
            x_h, y_h, method=method, verbose=0, max_growth=np.inf
        )
    return {
        "peak_extra_bytes": max(rss.peak - rss.start, 0),
        "held_bytes": model.last_run.held_bytes(),
    }


def memory(steps_list, repeats):
    """Runs `memory_probe` `repeats` times, each in a fresh process, per
    method and T; keeps the median peak and every probe's.

    Identical probes of the same run differ by a few MiB (the allocator's
    arenas), which is why one probe per setting is not enough.
    """
    out = {}
    for method in ("drmad", "exact"):
        for steps in steps_list:
            probes = []
            for _ in range(repeats):
                done = subprocess.run(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        f"--probe={method},{steps}",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                probes.append(json.loads(done.stdout.strip().splitlines()[-1]))
            peaks = [p["peak_extra_bytes"] for p in probes]
            out[f"{method}/{steps}"] = {
                "peak_extra_bytes": statistics.median(peaks),
                "peak_extra_bytes_all": peaks,
                "held_bytes": probes[0]["held_bytes"],
            }
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet()
    if FLAGS.probe:
        method, steps = FLAGS.probe.split(",")
        print(json.dumps(memory_probe(method, int(steps))))
        return

    config = common.paper_config()
    split = common.splits(config)
    steps = 200 if FLAGS.quick else 1000
    repeats = 1 if FLAGS.quick else 3
    steps_list = (40, 80) if FLAGS.quick else (250, 1000, 4000)

    rates = steps_per_second(config, *split.eset, steps, repeats)
    episodes = episode_seconds(config, split, steps, repeats)
    mem = memory(steps_list, 1 if FLAGS.quick else 5)
    results = {
        "steps": steps,
        "rates": rates,
        "episodes": episodes,
        "memory": mem,
        "quick": FLAGS.quick,
    }

    stock = rates["stock fit"]
    print(f"\nElementary steps per second (T = {steps}, batch 50):\n")
    print(
        common.table(
            ["training", "steps/s", "ratio to stock fit"],
            [[k, f"{v:.0f}", f"{v / stock:.2f}"] for k, v in rates.items()],
        )
    )
    print(f"\nOne episode (meta-forward + meta-backward), T = {steps}:\n")
    base = episodes["stock fit"]
    print(
        common.table(
            ["what", "seconds", "ratio to stock fit of T steps"],
            [[k, f"{v:.2f}", f"{v / base:.2f}"] for k, v in episodes.items()],
        )
    )
    print(
        "\nPeak extra memory of a run and its meta-backward (median of the "
        "probes; drmad's range in brackets):\n"
    )
    rows = []
    for steps_m in steps_list:
        d, e = mem[f"drmad/{steps_m}"], mem[f"exact/{steps_m}"]
        low, high = (
            min(d["peak_extra_bytes_all"]),
            max(d["peak_extra_bytes_all"]),
        )
        rows.append(
            [
                steps_m,
                f"{d['peak_extra_bytes'] / 2**20:.1f} "
                f"[{low / 2**20:.1f}, {high / 2**20:.1f}]",
                f"{e['peak_extra_bytes'] / 2**20:.1f}",
                f"{d['held_bytes'] / 2**20:.2f}",
                f"{e['held_bytes'] / 2**20:.1f}",
            ]
        )
    print(
        common.table(
            [
                "T",
                "drmad peak MiB",
                "exact peak MiB",
                "drmad held MiB",
                "exact held MiB",
            ],
            rows,
        )
    )
    print(f"\nwritten to {common.save('cost', results)}")


if __name__ == "__main__":
    app.run(main)
