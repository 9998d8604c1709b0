"""One small trained-and-exported model shared by the export and serve tests (trained once per
session, through the CLI in subprocesses, on top of conftest's `tiny_overrides`).

The item tower is the packaged MiniLM, frozen, rather than the tiny random BERT: a test checks that a
new item whose text repeats a history's items is recommended for that history, which needs an
encoder that knows which texts are alike (with the random BERT that is a coin flip)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from helpers import twotower

MODEL_OVERRIDES = ["model.mode=id+text", "model.item.encoder=minilm", "model.item.train_layers=0", "trainer.max_epochs=1"]


@dataclass(frozen=True)
class ExportedRun:
    run: Path
    "The run folder: config.yaml, checkpoints/best.ckpt."
    model: Path
    "What `twotower export` wrote."

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "best.ckpt"


def exported_run(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> ExportedRun:
    """Fit and export once per test session, under a lock in a folder that every pytest-xdist
    worker of the session shares (the parent of their temporary folders); the `done` marker is
    written last, so a failed attempt is retried rather than reused. Tests read the result only."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "exported-run"
    result = ExportedRun(run=cache / "run", model=cache / "export")
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.with_name("exported-run.lock")):
        if (cache / "done").is_file():
            return result
        overrides = [o for o in tiny_overrides if not o.startswith(("data.dir=", "run.dir="))]
        overrides += [f"data.dir={cache / 'data'}", f"run.dir={result.run}", *MODEL_OVERRIDES]
        fit = twotower("fit", *overrides, cwd=cache)
        assert fit.returncode == 0, fit.stderr[-3000:]
        export = twotower("export", "--checkpoint", str(result.checkpoint), "--out", str(result.model), cwd=cache)
        assert export.returncode == 0, export.stderr[-3000:]
        (cache / "done").touch()
    return result
