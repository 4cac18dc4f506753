"""keras-tuner's distributed mode: a chief oracle and two workers, as
subprocesses talking over the loopback address only."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import drmad_keras  # noqa: F401  (the package must import before the run)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "distributed_search.py")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(role, directory, port, log, steps):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        PYTHONUNBUFFERED="1",
        KERASTUNER_TUNER_ID=role,
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(port),
        EPISODE_STEPS=str(steps),
    )
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(directory)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_for(path, text, deadline):
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("kill_a_worker", [False, True])
def test_chief_and_two_workers(tmp_path, kill_a_worker):
    port = _free_port()
    # Long episodes when a worker is to be killed in the middle of one.
    steps = 4000 if kill_a_worker else 25
    logs = {
        r: open(tmp_path / f"{r}.log", "w")
        for r in ("chief", "tuner0", "tuner1")
    }
    procs = {"chief": _start("chief", tmp_path, port, logs["chief"], steps)}
    time.sleep(3)
    for role in ("tuner0", "tuner1"):
        procs[role] = _start(role, tmp_path, port, logs[role], steps)
    try:
        if kill_a_worker:
            # Once tuner1 has finished an episode, kill it in the middle of
            # its next one, then start it again under the same id.
            log = tmp_path / "tuner1.log"
            assert _wait_for(log, "episode", time.time() + 240), log.read_text()
            procs["tuner1"].send_signal(signal.SIGKILL)
            procs["tuner1"].wait()
            procs["tuner1"] = _start(
                "tuner1", tmp_path, port, logs["tuner1"], steps
            )
        for role in ("tuner0", "tuner1", "chief"):
            assert procs[role].wait(timeout=400) == 0, (
                tmp_path / f"{role}.log"
            ).read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for log in logs.values():
            log.close()

    episodes = json.loads((tmp_path / "episodes.json").read_text())
    assert len(episodes) == 6
    assert all(e["status"] == "COMPLETED" for e in episodes)
    assert sorted(e["chain"] for e in episodes) == [0, 0, 0, 1, 1, 1]
    if kill_a_worker:
        # Restarted, the killed worker took up an episode again.
        after = (tmp_path / "tuner1.log").read_text().split("Reloading")[-1]
        assert "episode " in after
    # Both workers ran episodes.
    worked = [
        (tmp_path / f"tuner{i}.log").read_text().count("episode ")
        for i in (0, 1)
    ]
    assert all(count > 0 for count in worked), worked
    # Within a chain, each episode starts where the previous one ended.
    for chain in (0, 1):
        rows = [e for e in episodes if e["chain"] == chain]
        for before, after in zip(rows, rows[1:]):
            npz = tmp_path / "distributed" / f"trial_{before['trial_id']}"
            import numpy as np

            with np.load(npz / "episode.npz") as saved:
                for name, value in after["log_l2"].items():
                    assert value == pytest.approx(
                        float(saved[f"next/{name}"]), rel=1e-6
                    )
