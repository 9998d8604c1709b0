"""Checkpoints across strategies: which one a run resumes from, and a plain fp32 state dict out of
either kind Lightning writes.

* One process or DDP: `best.ckpt` / `last.ckpt` are single files (rank 0 writes them).
* DeepSpeed: they are folders; every rank writes its shard (`checkpoint/zero_pp_rank_R_*`) and
  rank 0 the Lightning state (`checkpoint/mp_rank_00_model_states.pt`). Resuming needs the same
  world size; `consolidate_checkpoint` merges the shards into one fp32 state dict that loads into
  `TwoTowerModule` (or `TwoTower`, dropping the `model.` prefix) without DeepSpeed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from twotower.files import atomic_file

INTERRUPTED = "interrupted.ckpt"
"Written in `checkpoints/` when SIGTERM stops training (`SaveOnSigterm`)."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written as temp name, fsync, rename, fsync of the folder: a kill or a full
    disk during a save leaves the previous checkpoint as it was, never a truncated file under the
    real name. (DeepSpeed writes its own checkpoint folders and does not use this.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


class SaveOnSigterm(pl.Callback):
    """SIGTERM (a scheduler's preemption, `kill`, `scancel`): Lightning stops at the next step on
    every rank; this saves `checkpoints/interrupted.ckpt` there, which `trainer.resume=auto` picks
    up. (SIGUSR1 under SLURM is Lightning's own: an `hpc_ckpt_N.ckpt` and a requeue.)"""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.folder / INTERRUPTED)


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "checkpoint").is_dir()


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """`trainer.resume` -> the `ckpt_path` for `Trainer.fit`.

    `auto` picks the newest of `checkpoints/last.ckpt` (end of each validated epoch),
    `checkpoints/interrupted.ckpt` (SIGTERM) and Lightning's `hpc_ckpt_N.ckpt` (written on SLURM's
    SIGUSR1 just before a requeue), or None for a fresh run."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).exists():
            raise FileNotFoundError(f"trainer.resume={resume}: no such checkpoint")
        return resume
    folder = run_dir / "checkpoints"
    candidates = [p for p in [folder / "last.ckpt", folder / INTERRUPTED, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def consolidate_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The Lightning checkpoint dict of `ckpt_path` with `state_dict` as plain fp32 CPU tensors.

    A file (one process, DDP) is loaded as it is. A DeepSpeed folder (ZeRO 1/2/3) goes through
    Lightning's `convert_zero_checkpoint_to_fp32_state_dict`, which merges the per-rank shards;
    that needs DeepSpeed installed, the result does not. `hyper_parameters` (config, num_items)
    are kept, optimizer state is not (ZeRO's is sharded and tied to the world size)."""
    path = Path(ckpt_path)
    if not is_deepspeed_checkpoint(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
    else:
        import os
        import tempfile

        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            state = convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "fp32.ckpt", tag="checkpoint")
    state["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    state.pop("optimizer_states", None)
    return state


def load_initial_weights(module: pl.LightningModule, checkpoint: str, num_items: int) -> None:
    """`trainer.init_weights`: every parameter of `module` from `checkpoint`'s (a file or a DeepSpeed
    folder), and nothing else from it (optimizer, schedule, epoch, stale table start fresh). The
    checkpoint's training settings may differ (which encoder layers train, the loss); its parameters
    must match the module's, name for name and shape for shape."""
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"trainer.init_weights={checkpoint}: no such checkpoint")
    state = consolidate_checkpoint(checkpoint)
    trained_items = state["hyper_parameters"]["num_items"]
    if trained_items != num_items:
        raise ValueError(f"trainer.init_weights={checkpoint}: trained on {trained_items} items, this data has {num_items}")
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as error:  # torch names every missing, unexpected and mis-shaped parameter
        raise ValueError(f"trainer.init_weights={checkpoint}: its parameters do not fit this model (model.mode, "
                         f"model.dim and the towers' shapes must match the run that wrote it): {error}") from None
