"""Every benchmark runs in its --quick mode, so that none of them rots."""

import json
import os
import subprocess
import sys

import pytest

from drmad_keras import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, header",
    [
        ("cost", "| training | steps/s | ratio to stock fit |"),
        ("accuracy", "| alpha | T | init log_l2 |"),
        ("tuners", "| log_l2 per | method | trials |"),
        ("methods", "| method | HSet loss, episode 0 |"),
    ],
)
def test_benchmark_quick(tmp_path, name, header):
    args = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", f"{name}.py"),
        "--quick",
        f"--out_dir={tmp_path}",
    ]
    if name in ("tuners", "methods"):
        args.append(f"--workdir={tmp_path / 'work'}")
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert header in done.stdout
    results = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["quick"] is True
    if name == "cost":
        assert results["rates"]["DrMADModel.fit"] > 0
        held = results["memory"]
        # The drmad record holds the same bytes whatever T is.
        assert held["drmad/40"]["held_bytes"] == held["drmad/80"]["held_bytes"]
        assert held["exact/80"]["held_bytes"] > held["exact/40"]["held_bytes"]
    if name == "accuracy":
        for row in results["finite_differences"]:
            assert row["relative_error"] < 0.02
        kinds = {
            options.kind_of(row["name"])
            for row in results["finite_differences"]
        }
        assert kinds == set(options.KINDS)
        for setting in results["kinds"]:
            for kind, found in setting["kinds"].items():
                assert -1.0 <= found["cosine"] <= 1.0, (kind, found)
    if name == "tuners":
        for regime in ("layer", "unit"):
            assert set(results[regime]) == {"drmad", "random", "bayesian"}
        assert (tmp_path / "tuners_unit.png").exists()
    if name == "methods":
        rows = {r["label"]: r for r in results["rows"]}
        assert all(r["episodes"] == 3 for r in rows.values())
        # Same start, same theta_0 and batches: tuning online within the
        # run beats the plain run at the starting values.
        assert (
            rows["t1t2"]["first_hset_loss"] < rows["drmad"]["first_hset_loss"]
        )
