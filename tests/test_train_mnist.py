"""bin/train_mnist end to end, with tiny settings, as a subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "train_mnist")
TINY = [
    "--episodes=2",
    "--steps=20",
    "--hidden=8,8",
    "--eset=200",
    "--hset=100",
    "--vset=100",
    "--test=100",
    "--batch_size=20",
]


def run_script(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_end_to_end_writes_its_files(tmp_path):
    out = tmp_path / "run"
    done = run_script(*TINY, f"--output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("episode ") >= 2
    assert "(best)" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert [e["episode"] for e in results["episodes"]] == [0, 1]
    assert results["config"]["hidden"] == [8, 8]
    for row in results["episodes"]:
        assert set(row["log_l2"]) == {
            "log_l2_hidden1",
            "log_l2_hidden2",
            "log_l2_logits",
        }
        assert 0.0 <= row["val_error"] <= 1.0
    assert 0.0 <= results["best"]["test_error"] <= 1.0
    for name in ("log_l2.png", "losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = os.listdir(out / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)

    # A second run on the same directory continues the chain.
    more = run_script(*TINY[1:], "--episodes=3", f"--output_dir={out}")
    assert more.returncode == 0, more.stderr
    results = json.loads((out / "results.json").read_text())
    assert [e["episode"] for e in results["episodes"]] == [0, 1, 2]
    assert more.stdout.count("episode ") >= 1


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--steps=0"], "steps"),
        (["--momentum=1.0"], "momentum"),
        (["--hidden="], "hidden"),
        (["--hidden=50,x"], "hidden"),
        (["--method=adjoint"], "method"),
        (["--steps=10", "--reverse_steps=20"], "reverse_steps"),
        (["--batch_size=500", "--eset=100"], "batch_size"),
        (["--steps=abc"], "steps"),
        (["--source=cifar"], "source"),
        (["stray"], "unexpected"),
        (["--eset=4500"], "more images"),
        (["--seed=-1"], "seed"),
        (["--tune=log_l2,momentum"], "tune"),
        (["--method=t1t2", "--tune=log_l2,log_lr"], "log_l2 only"),
        (["--t1t2_interval=0"], "t1t2_interval"),
        (["--ranges=log_lr:-5"], "kind:low:high"),
        (["--ranges=log_lr:a:b"], "kind:low:high"),
        (["--ranges=momentum:-5:0"], "ranges kind"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, flag):
    done = run_script(*args, f"--output_dir={tmp_path}", timeout=120)
    assert done.returncode == 2
    errors = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("train_mnist: error:")
    ]
    assert len(errors) == 1 and flag in errors[0], done.stderr
    # Nothing else: the settings are refused before TensorFlow loads.
    assert done.stderr.strip() == errors[0]


def test_t1t2_and_more_kinds_end_to_end(tmp_path):
    online = run_script(
        *TINY, "--method=t1t2", "--t1t2_interval=5", f"--output_dir={tmp_path}"
    )
    assert online.returncode == 0, online.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["method"] == "t1t2"
    assert results["config"]["meta_learning_rate"] == 0.02
    first, second = results["episodes"]
    assert first["log_l2"] != second["log_l2"]

    out = tmp_path / "kinds"
    kinds = run_script(
        *TINY,
        "--tune=log_l2,log_lr,logit_momentum,log_init_scale",
        "--schedule_blocks=2",
        "--ranges=log_lr:-2.4:-2.25",
        f"--output_dir={out}",
    )
    assert kinds.returncode == 0, kinds.stderr
    assert "best log_lr:" in kinds.stdout
    results = json.loads((out / "results.json").read_text())
    for kind in ("log_lr", "logit_momentum", "log_init_scale"):
        assert set(results["episodes"][1][kind]) == {
            f"{kind}_hidden1",
            f"{kind}_hidden2",
            f"{kind}_logits",
        }
        assert (out / f"{kind}.png").exists()
    for row in results["episodes"]:
        for value in row["log_lr"].values():
            assert -2.4 <= value <= -2.25


def test_a_run_with_no_finished_episode(tmp_path):
    # Every episode diverges: exit 2, and the directory does not block a
    # corrected run.
    done = run_script(
        *TINY, "--learning_rate=1e6", "--steps=40", f"--output_dir={tmp_path}"
    )
    assert done.returncode == 2
    assert "no episode finished" in done.stderr.strip().splitlines()[-1]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(e["status"] == "FAILED" for e in results["episodes"])
    assert "diverged" in results["episodes"][0]["message"]
    assert "Traceback" not in results["episodes"][0]["message"]
    again = run_script(*TINY, f"--output_dir={tmp_path}")
    assert again.returncode == 0, again.stderr


def test_gpu_flag_without_a_gpu(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    done = run_script(*TINY, "--gpu", f"--output_dir={tmp_path}")
    assert done.returncode == 2
    assert "no GPU" in done.stderr
