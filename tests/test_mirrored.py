"""A MirroredStrategy over two logical CPU devices splits each step's batch
and gives the hypergradient of one device."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mirrored_strategy_matches_one_device(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "mirrored_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    single, mirrored = out["single"], out["mirrored"]
    assert mirrored["replicas"] == 2
    # keras-tuner's distribution_strategy reaches the episodes' models.
    assert out["tuner"] == [2, "COMPLETED", True]
    for a, b in zip(single["theta_T"], mirrored["theta_T"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for method in ("drmad", "exact"):
        for name, value in single[method].items():
            np.testing.assert_allclose(mirrored[method][name], value, rtol=1e-4)
