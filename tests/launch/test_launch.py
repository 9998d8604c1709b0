"""The launchers with real processes.

* `launch/torchrun.sh` starts 2 CPU processes that train the tiny model on the built-in data
  (Lightning sees TorchElastic's world: 2 ranks).
* `launch/slurm.sbatch`: its environment handling, with `srun`/`scontrol` replaced by recording
  shims (multi-node values: MASTER_ADDR is the allocation's first host, devices/num_nodes follow
  the allocation). A live one-node SLURM (slurmctld + slurmd + munge) is used when the machine
  has one running (`sinfo` answers); otherwise that test is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import sbatch_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_script_trains_with_two_cpu_processes(tiny_overrides, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(29_000 + os.getpid() % 1000)}
    result = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc-per-node", "2", "--",
                             *tiny_overrides, "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.num_threads=1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MEMBER: 2/2" in result.stderr or "distributed_backend=gloo" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] > 0 and 0.0 <= summary["test/ndcg@10"] <= 1.0


def _shims(folder: Path) -> Path:
    """`scontrol show hostnames` prints the (fake) allocation; `srun` records its arguments."""
    folder.mkdir()
    (folder / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (folder / "srun").write_text('#!/usr/bin/env bash\necho "MASTER=$MASTER_ADDR:$MASTER_PORT ARGS=$*" > "$SRUN_LOG"\n')
    for shim in folder.iterdir():
        shim.chmod(0o755)
    return folder


def test_sbatch_script_derives_the_world_from_the_allocation(tmp_path):
    shims = _shims(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.log"),
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "trainer.max_epochs=3"],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    recorded = (tmp_path / "srun.log").read_text()
    assert "MASTER=gpu-a17:" in recorded and f":{15000 + 4242}" in recorded
    assert "-m twotower fit trainer.devices=4 trainer.num_nodes=2 trainer.resume=auto trainer.max_epochs=3" in recorded
    assert "--kill-on-bad-exit=1" in recorded


def test_sbatch_script_asks_for_one_task_per_gpu_and_a_requeue_signal():
    header = [line for line in (ROOT / "launch" / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=USR1@90" in header and "#SBATCH --requeue" in header
    tasks = next(line for line in header if "--ntasks-per-node" in line).split("=")[1]
    gpus = next(line for line in header if "--gpus-per-node" in line).split("=")[1]
    assert tasks == gpus


def _slurm_running() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout.strip() in ("idle", "mix")
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_running(), reason="no live SLURM here (launch/slurm_local.sh start DIR; see docs/slurm-local.md)")
def test_sbatch_on_a_live_one_node_cluster(tiny_overrides, tmp_path):
    """Two srun tasks on one node: each task is a rank of the srun world (SLURM_PROCID 0 and 1 of 2,
    SLURM_LOCALID 0 and 1), Lightning's SLURMEnvironment trains with that world, rank 0 writes
    summary.json. The real script, less its GPU and CPU requests (the node has 2 CPUs, no GPU)."""
    # $PYTHON as each srun task sees it: records the task's SLURM world, then runs the real interpreter.
    script, python, ranks = sbatch_job(tmp_path, "$SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_ID")
    out = tmp_path / "slurm.out"
    env = {**os.environ, "PYTHON": str(python), "HF_HUB_OFFLINE": "1"}
    env.pop("MASTER_PORT", None)
    submit = subprocess.Popen(["sbatch", "--parsable", "--wait", "--time=8", "--ntasks-per-node=2", f"--output={out}",
                               f"--chdir={ROOT}", str(script),
                               *tiny_overrides, "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.num_threads=1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = submit.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        submit.kill()
        stdout, stderr = submit.communicate()
        job = stdout.strip().split(";")[0]
        if job:
            subprocess.run(["scancel", job], timeout=30)
        log = out.read_text()[-4000:] if out.exists() else ""
        pytest.fail(f"job {job or '?'} still running after 420 s (cancelled)\n{log}")
    log = out.read_text() if out.exists() else ""
    assert submit.returncode == 0, stderr + log[-4000:]
    assert "twotower: 1 node(s) x 2 task(s)" in log, log[-4000:]
    seen = sorted((path.read_text().split() for path in ranks.iterdir()), key=lambda row: row[0])
    job = stdout.strip().split(";")[0]
    assert seen == [["0", "0", "2", job], ["1", "1", "2", job]], seen
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-4000:]  # Lightning's world: 2 processes
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] > 0
