"""What the benchmarks share: data, models, timing and output."""

import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from drmad_keras import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

flags.DEFINE_string(
    "out_dir",
    os.path.join(HERE, "out"),
    "Where the JSON results and plots are written.",
)


def quiet():
    """Keeps library logging to warnings, so that the tables stand out."""
    logging.set_verbosity(logging.WARNING)


def paper_config(**changes):
    """The paper MLP (784-50-50-50-10 tanh, batch 50, alpha 0.1, gamma 0.9)
    as a `train.Config`, with `changes`."""
    return train.Config(verbose=0, **changes)


def splits(config):
    """The MNIST-sample splits of `config`."""
    return train.load_splits(config)


def drmad_model(config):
    """A compiled `DrMADModel` of `config`, seeded."""
    keras.utils.set_random_seed(config.seed)
    return train.build_model(config)


def stock_model(config, **compile_changes):
    """The same network as a plain `keras.Model`, seeded, for stock `fit`.

    Its optimizer is `MomentumSGD`, which is Keras' own SGD with
    `learning_rate = alpha * (1 - gamma)` and `momentum = gamma`.
    """
    keras.utils.set_random_seed(config.seed)
    model = train.build_model(
        config, model_class=keras.Model, metrics=["accuracy"]
    )
    if compile_changes:
        model.compile(
            optimizer=model.optimizer,
            loss=model.loss,
            metrics=["accuracy"],
            **compile_changes,
        )
    return model


def median_time(fn, repeats):
    """Median wall time of `repeats` calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save(name, results):
    """Writes `results` to `--out_dir`/NAME.json; returns the path."""
    out = flags.FLAGS.out_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return path


def table(header, rows):
    """A Markdown table as a string."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)
