"""`twotower fit`: prepare (if needed) -> data -> model -> loggers and callbacks -> Trainer.fit
-> test (and cold) on the best checkpoint -> run folder (summary.json, curves, table)."""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from configs import Config, to_yaml
from datamodules.datamodule import ShardDataModule
from datamodules.prepare import prepare
from modules.lit_two_tower import TwoTowerModule
from trainers.checkpoints import (INTERRUPTED, AtomicCheckpointIO, SaveOnSigterm, consolidate_checkpoint,
                                  is_deepspeed_checkpoint, resolve_resume)
from trainers.evaluate import popularity_metrics
from trainers.run_folder import metrics_table, plot_curves, without_prefix, write_atomic, write_json
from trainers.run_info import run_info
from trainers.strategies import build_strategy

MONITOR = "val/ndcg@10"


def parameter_counts(module: TwoTowerModule) -> dict[str, int]:
    towers = {"item_tower": module.model.item_tower, "user_tower": module.model.user_tower}
    counts = {"params/total": sum(p.numel() for p in module.parameters())}
    for name, tower in towers.items():
        counts[f"params/{name}"] = sum(p.numel() for p in tower.parameters())
        counts[f"params/{name}_trainable"] = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    return counts


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
        write_atomic(id_file, run_id)
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


@contextmanager
def _exclusive(lock_file: Path):
    """One process at a time (every rank runs `fit` from the top; the first prepares the shards,
    the others then find them up to date). Needs a shared file system across nodes, as the shards do."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def test_checkpoint(trainer: pl.Trainer, best: str | None, run_dir: Path) -> str | None:
    """The checkpoint `trainer.test` restores. A DeepSpeed run also gets `best-fp32.ckpt`, the best
    checkpoint consolidated into one plain file (for evaluate/export, no DeepSpeed needed). Under
    ZeRO-3, test restores that file (`load_full_weights`: DeepSpeed 0.19 cannot reload a ZeRO-3
    folder into an inference engine, `DeepSpeedZeRoOffload` lacks `_restore_from_bit16_weights`)."""
    if best is None or not is_deepspeed_checkpoint(best):
        return best
    fp32 = run_dir / "checkpoints" / "best-fp32.ckpt"
    if trainer.is_global_zero:
        torch.save(consolidate_checkpoint(best), fp32)
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


def fit(cfg: Config) -> dict[str, float]:
    started = time.time()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run.dir)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    info = run_info(cfg)
    if rank_zero_only.rank == 0:
        write_json(run_dir / "run_info.json", info)

    data_dir = Path(cfg.data.dir)
    with _exclusive(data_dir.with_name(f".{data_dir.name}.lock")):
        prepare(cfg)
    data = ShardDataModule(cfg, fault_log=run_dir / ".data_faults")  # data.on_error=skip: what each rank skipped
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold, len(data.actions))
    module.model.item_tower.set_catalogue(data.catalogue.tokens, data.catalogue.lengths)

    t = cfg.trainer
    resume = resolve_resume(t.resume, run_dir)
    if resume is None:
        data.forget_faults()
    trainer, checkpoint = build_trainer(cfg, run_dir, build_loggers(cfg, run_dir, resuming=resume is not None), t.max_epochs)
    for logger in trainer.loggers:
        logger.log_metrics(parameter_counts(module), step=0)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except SIGTERMException:
        print(f"fit: stopped by SIGTERM at step {trainer.global_step}; saved {run_dir / 'checkpoints' / INTERRUPTED}; "
              "the same command with trainer.resume=auto continues", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)

    summary: dict[str, float] = {"best/" + MONITOR: float(checkpoint.best_model_score or float("nan"))}
    rows = {}
    best = test_checkpoint(trainer, checkpoint.best_model_path or None, run_dir)
    for split in ("test", "cold"):
        if not data.manifest["counts"][split]:
            continue
        module.test_split = data.test_split = split
        model_metrics = trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)[0]
        baseline = popularity_metrics(data, split)
        summary.update(model_metrics)
        summary.update({f"popularity/{k}": v for k, v in baseline.items()})
        rows[f"{cfg.model.mode} ({split})"] = without_prefix(model_metrics)
        rows[f"popularity ({split})"] = without_prefix(baseline)
    summary["wall_s"] = time.time() - started
    summary["epochs"] = trainer.current_epoch
    summary["steps"] = trainer.global_step
    fault_counts, faults = data.fault_report()
    if cfg.data.on_error == "skip":  # under raise, any fault has stopped the run
        summary.update(fault_counts)
    if trainer.is_global_zero:
        if faults:
            write_json(run_dir / "data_faults.json", faults)
        write_json(run_dir / "summary.json", summary)
        finish_wandb(trainer.loggers, summary, info)
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
        print(f"\n{metrics_table(rows, cfg.eval.ks)}\n\nrun folder: {run_dir}  ({summary['wall_s']:.0f}s)")
    return summary
