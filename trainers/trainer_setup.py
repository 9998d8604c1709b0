"""The Lightning Trainer that `fit` and `update` share: its loggers (CSV, W&B), the best and last
checkpoints by validation NDCG@10, and the checkpoint `trainer.test` restores."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from twotower.configs import Config
from twotower.files import atomic_file, write_text
from twotower.modules.lit_two_tower import MONITOR
from twotower.trainers.checkpoints import AtomicCheckpointIO, SaveOnSigterm, consolidate_checkpoint, is_deepspeed_checkpoint
from twotower.trainers.plateau import PlateauSchedule
from twotower.trainers.strategies import build_strategy


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run folder: a resumed run continues the same W&B run. Every rank
    computes one, but only rank 0's WandbLogger ever creates a run (Lightning's `rank_zero_experiment`).
    Under `wandb agent` the id is the one the agent chose (`WANDB_RUN_ID`): the sweep waits for that run."""
    import secrets

    id_file = run_dir / ".wandb_id"
    if resuming and id_file.is_file():
        return id_file.read_text().strip()
    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    if rank_zero_only.rank == 0:
        write_text(id_file, run_id)
    return run_id


def build_loggers(cfg: Config, run_dir: Path, resuming: bool = False) -> list:
    """CSV always, W&B when enabled. Both write from global rank 0 only (Lightning's loggers are
    rank-zero-only), whatever the number of processes."""
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb = cfg.logger.wandb
    if wandb.mode != "disabled":
        loggers.append(WandbLogger(name=cfg.run.name, project=wandb.project, entity=wandb.entity, group=wandb.group,
                                   id=wandb_run_id(run_dir, resuming), resume="allow",
                                   tags=list(wandb.tags), mode=wandb.mode, save_dir=str(run_dir),
                                   config=OmegaConf.to_container(OmegaConf.structured(cfg))))
    return loggers


def finish_wandb(loggers: list, summary: dict[str, float], info: dict) -> None:
    """W&B gets what the run folder has: run_info.json (seed, git, packages) in its config, and
    summary.json's metrics, under the same names, in its summary. `val/ndcg@10` there is the best
    epoch's value (the checkpoint's, what `compare` ranks by), not the last: a W&B sweep ranks runs
    by that summary value. Call on global rank 0 only."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update({"run_info": {k: v for k, v in info.items() if k != "config"}}, allow_val_change=True)
            logger.experiment.summary.update({**summary, MONITOR: summary["best/" + MONITOR]})


def test_checkpoint(trainer: pl.Trainer, best: str | None, run_dir: Path) -> str | None:
    """The checkpoint `trainer.test` restores. A DeepSpeed run also gets `best-fp32.ckpt`, the best
    checkpoint consolidated into one plain file (for evaluate/export, no DeepSpeed needed). Under
    ZeRO-3, test restores that file (`load_full_weights`: DeepSpeed 0.19 cannot reload a ZeRO-3
    folder into an inference engine, `DeepSpeedZeRoOffload` lacks `_restore_from_bit16_weights`)."""
    if best is None or not is_deepspeed_checkpoint(best):
        return best
    fp32 = run_dir / "checkpoints" / "best-fp32.ckpt"
    if trainer.is_global_zero:
        with atomic_file(fp32) as tmp:
            torch.save(consolidate_checkpoint(best), tmp)
    trainer.strategy.barrier("consolidate")
    if trainer.strategy.zero_stage_3:
        trainer.strategy.load_full_weights = True
        return str(fp32)
    return best


def build_trainer(cfg: Config, run_dir: Path, loggers: list, max_epochs: int) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Trainer of `fit` and `update`: strategy and precision from `cfg.trainer`, the best and
    last checkpoints (by val/ndcg@10) in `run_dir/checkpoints/`, written atomically, a checkpoint
    on SIGTERM, early stopping when configured."""
    t = cfg.trainer
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR, mode="max", save_last=True)
    callbacks = [checkpoint, SaveOnSigterm(run_dir / "checkpoints")]
    if t.patience:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience))
    if t.lr_plateau_patience:
        callbacks.append(PlateauSchedule(t.lr_plateau_patience, t.lr_plateau_factor))
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t),
        precision=t.precision, max_epochs=max_epochs, use_distributed_sampler=False,  # eval shares: ShardDataModule
        max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val or None,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir), enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=False,
        # A fresh training loader per epoch, built with that epoch's number: a run resumed from an
        # epoch-end checkpoint then shuffles as the uninterrupted run did (Lightning would otherwise
        # reuse the loader it built on restore, before the finished epoch was counted).
        reload_dataloaders_every_n_epochs=1,
        plugins=[AtomicCheckpointIO()] if t.strategy != "deepspeed" else None,
    )
    return trainer, checkpoint
