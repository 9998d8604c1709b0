"""Training survives faults: SIGKILL at a random moment and SIGTERM both resume (`trainer.resume=auto`)
to the metrics of an uninterrupted run; a save cut short never replaces a good checkpoint; NaN/Inf
stops training naming the step (or, when asked, skips the step)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from twotower.trainers.checkpoints import INTERRUPTED, AtomicCheckpointIO

from conftest import tiny
from helpers import twotower

RUN = ["model.mode=id", "data.synthetic.num_users=600", "data.batch_size=32", "trainer.max_epochs=3"]
"Small, but several epochs of ~19 steps: long enough to be killed in the middle."


def _overrides(base: list[str], run_dir) -> list[str]:
    kept = [o for o in base if not o.startswith(("trainer.max_epochs", "data.synthetic.num_users", "data.batch_size", "run.dir"))]
    return kept + RUN + [f"run.dir={run_dir}"]


def _start(args: list[str], cwd) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", "twotower", "fit", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def _test_metrics(run_dir) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k.startswith("test/")}


@pytest.fixture(scope="module")
def shared(tiny_bert, tmp_path_factory):
    """One data folder for this module's runs (prepared by the first), so they train on the same shards."""
    return tiny(tiny_bert, tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def uninterrupted(shared, tmp_path_factory) -> dict[str, float]:
    folder = tmp_path_factory.mktemp("whole")
    result = twotower("fit", *_overrides(shared, folder / "run"), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return _test_metrics(folder / "run")


def _assert_same_metrics(resumed: dict[str, float], whole: dict[str, float]) -> None:
    assert resumed.keys() == whole.keys()
    for name, value in whole.items():
        assert resumed[name] == pytest.approx(value, abs=2e-3), (name, resumed[name], value)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(shared, tmp_path, uninterrupted, seed):
    run_dir = tmp_path / f"killed-{seed}"
    args = _overrides(shared, run_dir)
    process = _start(args, tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)  # at least one epoch done, then a random moment
    time.sleep(random.Random(seed).uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Whatever the moment, every checkpoint under its real name loads; a kill mid-save leaves at most
    # a hidden `.NAME.tmp-PID`, which nothing reads.
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in saved
    for name in saved:
        torch.load(run_dir / "checkpoints" / name, weights_only=False)

    resumed = twotower("fit", *args, "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_metrics(_test_metrics(run_dir), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(shared, tmp_path, uninterrupted):
    run_dir = tmp_path / "terminated"
    args = _overrides(shared, run_dir)
    process = _start(args, tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stderr and "resume=auto" in stderr
    saved = torch.load(run_dir / "checkpoints" / INTERRUPTED, weights_only=False)
    assert saved["global_step"] > 0 and not (run_dir / "summary.json").exists()

    resumed = twotower("fit", *args, "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_metrics(_test_metrics(run_dir), uninterrupted)


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise OSError("disk full")  # what a failure half-way through writing looks like

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_nan_stops_training_naming_the_step(tiny_overrides, tmp_path):
    diverging = ["model.mode=id", "trainer.lr=1e30", "trainer.gradient_clip_val=0"]
    result = twotower("fit", *tiny_overrides, *diverging, cwd=tmp_path)
    assert result.returncode == 1
    assert "non-finite loss or gradients at step" in result.stderr and "last good checkpoint" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nan_steps_are_skipped_when_asked(tiny_overrides, tmp_path):
    diverging = ["model.mode=id", "trainer.lr=1e30", "trainer.gradient_clip_val=0", "trainer.on_nan=skip"]
    result = twotower("fit", *tiny_overrides, *diverging, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = pd.read_csv(tmp_path / "run" / "metrics.csv")["train/skipped_steps"].dropna()
    assert skipped.sum() > 0
    weights = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
