"""The main job: tune the L2 penalties of an MLP on MNIST with DrMAD.

`bin/train_mnist` builds a `Config` from its flags and calls `run`. Tests
and benchmarks build their own `Config`.
"""

import contextlib
import dataclasses
import fcntl
import glob
import json
import math
import os
import shutil

import numpy as np
from absl import logging

from drmad_keras import data
from drmad_keras import options
from drmad_keras import tuner as tuner_lib
from drmad_keras.config import Config

PROJECT = "drmad"


def build_model(config, inputs=784, classes=10, model_class=None, metrics=None):
    """The MLP of `config`, compiled with `MomentumSGD(alpha, gamma)`.

    Args:
        config: `Config`.
        inputs: int, default 784.
        classes: int, default 10.
        model_class: class or None. `DrMADModel` by default; `keras.Model`
            gives the same network for stock Keras training (its penalty
            reaches the loss through the layers' `add_loss`).
        metrics: list or None. Passed to `compile`.

    Returns:
        The compiled model.
    """
    import keras

    from drmad_keras.model import DrMADModel
    from drmad_keras.optimizers import MomentumSGD
    from drmad_keras.regularizer import HyperRegularizer

    def regularized(layer):
        return HyperRegularizer(
            layer,
            init_log_l2=config.init_log_l2,
            granularity=config.granularity,
        )

    x_in = keras.Input((inputs,), name="pixels")
    h = x_in
    for i, width in enumerate(config.hidden):
        h = regularized(
            keras.layers.Dense(
                width, activation=config.activation, name=f"hidden{i + 1}"
            )
        )(h)
    logits = regularized(keras.layers.Dense(classes, name="logits"))(h)
    model = (model_class or DrMADModel)(x_in, logits, name="mlp")
    tuning = {}
    if isinstance(model, DrMADModel):
        tuning = {
            "tune": config.tune,
            "schedule_blocks": config.schedule_blocks,
        }
    model.compile(
        optimizer=MomentumSGD(
            alpha=config.learning_rate, gamma=config.momentum
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        **tuning,
    )
    return model


def load_splits(config):
    """The ESet, HSet, VSet and test splits that `config` asks for."""
    return data.load(
        config.source,
        sizes={
            "eset": config.eset,
            "hset": config.hset,
            "vset": config.vset,
            "test": config.test,
        },
        seed=config.seed,
        data_dir=config.data_dir,
    )


def _writable(output_dir):
    """Creates `output_dir`, or raises naming what is wrong."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(
            f"output_dir {output_dir!r} is a file, not a directory."
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"output_dir {output_dir!r} cannot be written: {error.strerror}."
        ) from None


@contextlib.contextmanager
def _exclusive(output_dir):
    """Holds `output_dir` for this process; refuses a second one."""
    lock = open(os.path.join(output_dir, ".lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise RuntimeError(
            f"output_dir {output_dir!r} is in use by another run (pid "
            f"{holder}); wait for it to finish or choose another output_dir."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _finished_episodes(output_dir):
    """How many trial files under `output_dir` say COMPLETED."""
    count = 0
    pattern = os.path.join(output_dir, PROJECT, "trial_*", "trial.json")
    for path in glob.glob(pattern):
        try:
            with open(path, encoding="utf-8") as f:
                count += json.load(f).get("status") == "COMPLETED"
        except (OSError, ValueError, AttributeError):
            count += 1  # Unreadable: let the resume report it.
    return count


def _check_settings(config):
    """Refuses to continue a run made with other settings.

    The settings are compared only once the directory holds an episode, so
    that a run that stopped before its first episode does not block a
    corrected one.
    """
    saved = os.path.join(config.output_dir, "config.json")
    current = config.chain_settings()
    started = _finished_episodes(config.output_dir)
    if not started:
        # Nothing worth keeping: start afresh with these settings.
        shutil.rmtree(
            os.path.join(config.output_dir, PROJECT), ignore_errors=True
        )
    if started and not os.path.exists(saved):
        raise ValueError(
            f"output_dir {config.output_dir!r} holds episodes but no "
            "config.json to check them against; choose another output_dir."
        )
    if started:
        try:
            with open(saved, encoding="utf-8") as f:
                previous = json.load(f)
            # A setting the saved run predates counts as its default.
            defaults = Config().chain_settings()
            changed = sorted(
                k
                for k in current
                if previous.get(k, defaults.get(k)) != current[k]
            )
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(
                f"{saved} cannot be read ({type(error).__name__}); choose "
                "another output_dir."
            ) from None
        if changed:
            raise ValueError(
                f"output_dir {config.output_dir!r} holds a run with other "
                f"settings ({', '.join(changed)}); resume it with the same "
                "settings or choose another output_dir."
            )
    tuner_lib.write_json(saved, current)


def run(config):
    """Runs the episodes of `config` and writes what they found.

    A run on an `output_dir` that already holds finished episodes continues
    from the last of them; a second process on the same `output_dir` is
    refused while the first runs. `results.json` is rewritten after every
    episode, and when the search stops on an error or an interrupt.

    Args:
        config: `Config`.

    Returns:
        dict: the content of `results.json`.

    Raises:
        ValueError: For an `output_dir` that cannot be written or holds a
            run with other settings.
        RuntimeError: If `output_dir` is in use or its files cannot be
            read, MNIST cannot be loaded, or no episode finished.
    """
    _writable(config.output_dir)
    with _exclusive(config.output_dir):
        splits = load_splits(config)
        logging.info("splits from %s: %s", splits.source, splits.sizes())
        _check_settings(config)
        return _search(config, splits)


class _MainJobTuner(tuner_lib.DrMADTuner):
    """Rewrites results.json after every episode."""

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        write_outputs(
            summarize(self, self.splits, self.config, test=False),
            self.config.output_dir,
            figures=False,
        )


def _search(config, splits):
    try:
        tuner = _MainJobTuner(
            lambda hp: build_model(config),
            max_trials=config.episodes,
            method=config.method,
            curvature=config.curvature,
            reverse_steps=config.reverse_steps,
            meta_optimizer=config.meta_optimizer,
            meta_learning_rate=config.meta_learning_rate,
            t1t2_interval=config.t1t2_interval,
            ranges={kind: (low, high) for kind, low, high in config.ranges},
            seed=config.seed,
            directory=config.output_dir,
            project_name=PROJECT,
            overwrite=False,
        )
    except (OSError, ValueError, KeyError) as error:
        raise RuntimeError(
            f"cannot resume from output_dir {config.output_dir!r}: "
            f"{type(error).__name__}: {str(error).splitlines()[0]}; a file "
            "of it is damaged: choose another output_dir."
        ) from error
    tuner.splits, tuner.config = splits, config

    try:
        tuner.search(
            *splits.eset,
            hyper_data=splits.hset,
            validation_data=splits.vset,
            batch_size=config.batch_size,
            steps=config.steps,
            verbose=config.verbose,
        )
    except (RuntimeError, KeyboardInterrupt) as error:
        # keras-tuner stops after too many failed trials in a row; keep
        # what finished (with the test errors of its first and best
        # episodes) and say where the reasons are.
        if isinstance(error, KeyboardInterrupt):
            write_outputs(
                summarize(tuner, splits, config, test=False),
                config.output_dir,
                figures=False,
            )
            raise
        write_outputs(summarize(tuner, splits, config), config.output_dir)
        raise RuntimeError(
            f"the search stopped: {str(error).splitlines()[0]} The reason "
            "of each failed episode is under 'message' in "
            f"{os.path.join(config.output_dir, 'results.json')}."
        ) from error
    results = summarize(tuner, splits, config)
    write_outputs(results, config.output_dir)
    if "best" not in results:
        failed = [e for e in results["episodes"] if e.get("message")]
        reason = failed[-1]["message"].splitlines()[0] if failed else ""
        raise RuntimeError(
            f"no episode finished; the last one failed: {reason}"
        )
    if config.verbose != 0:
        print(summary_text(results))
    return results


def _plain(value):
    """JSON-friendly copy of NumPy scalars and containers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(tuner, splits, config, test=True):
    """Episodes, the best one by VSet error, and (with `test`) the test
    errors of the first and the best episode."""
    episodes = _plain(tuner.episodes())
    completed = [e for e in episodes if e["status"] == "COMPLETED"]
    results = {
        "config": dataclasses.asdict(config),
        "episodes": episodes,
        "splits": splits.sizes(),
        "source": splits.source,
    }
    if not completed or not test:
        return _plain(results)
    best = min(completed, key=lambda e: (e["val_error"], e["episode"]))
    first = completed[0]
    for name, row in (("first", first), ("best", best)):
        model = tuner.load_model(tuner.oracle.get_trial(row["trial_id"]))
        test_loss, test_error = model.evaluate_split(*splits.test)
        results[name] = {
            **row,
            "test_loss": test_loss,
            "test_error": test_error,
        }
    return _plain(results)


def summary_text(results):
    """The closing summary, a few lines for a person."""
    if "best" not in results:
        return "no episode finished."
    lines = ["", "episode   hset_loss  val_error  test_error"]
    for name in ("first", "best"):
        row = results[name]
        lines.append(
            f"{row['episode']:7d}   {row['hset_loss']:9.4f}  "
            f"{row['val_error']:9.4f}  {row['test_error']:10.4f}   ({name})"
        )
    best = results["best"]
    online = results["config"]["method"] == "t1t2"
    for kind in options.KINDS:
        if best.get(kind):
            values = "  ".join(
                f"{name[len(kind) + 1 :]} "
                f"{best['next'][name] if online else value:+.3f}"
                for name, value in best[kind].items()
            )
            where = " (where its run ended)" if online else ""
            lines.append(f"best {kind}{where}: {values}")
    return "\n".join(lines)


def write_outputs(results, output_dir, figures=True):
    """Writes results.json and, with `figures`, TensorBoard scalars and PNG
    plots."""
    tuner_lib.write_json(os.path.join(output_dir, "results.json"), results)
    if not figures:
        return
    completed = [e for e in results["episodes"] if e["status"] == "COMPLETED"]
    if not completed:
        return
    _write_tensorboard(completed, os.path.join(output_dir, "tensorboard"))
    _write_plots(completed, output_dir)


def _write_tensorboard(episodes, logdir):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for row in episodes:
            step = row["episode"]
            for name in (
                "hset_loss",
                "val_error",
                "val_loss",
                "train_loss",
                "hypergradient_norm",
            ):
                if row.get(name) is not None:
                    tf.summary.scalar(name, row[name], step=step)
            for kind in options.KINDS:
                for name, value in row.get(kind, {}).items():
                    tf.summary.scalar(f"{kind}/{name}", value, step=step)
    writer.close()


def _write_plots(episodes, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [row["episode"] for row in episodes]

    # One figure per tuned kind: log_l2.png, log_lr.png, ...
    for kind in options.KINDS:
        names = episodes[0].get(kind)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot(
                x,
                [row[kind][name] for row in episodes],
                marker="o",
                label=name,
            )
        ax.set_xlabel("episode")
        ax.set_ylabel(f"{kind} (per unit or block: mean)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, f"{kind}.png"), dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        x,
        [row["hset_loss"] for row in episodes],
        marker="o",
        color="tab:blue",
        label="HSet loss",
    )
    ax.set_xlabel("episode")
    ax.set_ylabel("HSet loss", color="tab:blue")
    twin = ax.twinx()
    twin.plot(
        x,
        [row["val_error"] for row in episodes],
        marker="s",
        color="tab:red",
        label="VSet error",
    )
    twin.set_ylabel("VSet error", color="tab:red")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "losses.png"), dpi=100)
    plt.close(fig)
