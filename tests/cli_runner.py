"""Run the real `twotower` command line in a subprocess, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def twotower(*args: str, cwd: Path, timeout: float = 600, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m twotower ARGS` in `cwd`; `threads` caps each process's OpenMP threads (several
    ranks on 2 cores would otherwise oversubscribe them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "twotower", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
