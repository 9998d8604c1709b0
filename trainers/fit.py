"""`twotower fit`: prepare (if needed) -> data -> model -> loggers and callbacks -> Trainer.fit
-> test (and cold_valid, cold) on the best checkpoint -> run folder (summary.json, curves); the command line
prints the metrics table."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from twotower.configs import Config, to_yaml
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare
from twotower.files import exclusive, write_json, write_text
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.trainers.checkpoints import INTERRUPTED, load_initial_weights, resolve_resume
from twotower.trainers.evaluate import popularity_metrics
from twotower.trainers.run_folder import plot_curves
from twotower.trainers.run_info import run_info
from twotower.trainers.trainer_setup import (
    MONITOR,
    build_loggers,
    build_trainer,
    finish_wandb,
    test_checkpoint,
)

log = logging.getLogger(__name__)


def parameter_counts(module: TwoTowerModule) -> dict[str, int]:
    towers = {"item_tower": module.model.item_tower, "user_tower": module.model.user_tower}
    counts = {"params/total": sum(p.numel() for p in module.parameters())}
    for name, tower in towers.items():
        counts[f"params/{name}"] = sum(p.numel() for p in tower.parameters())
        counts[f"params/{name}_trainable"] = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    return counts


def fit(cfg: Config) -> dict[str, float]:
    started = time.time()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run.dir)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    info = run_info(cfg)
    if rank_zero_only.rank == 0:
        write_json(run_dir / "run_info.json", info)

    if cfg.data.shards_url is None:  # a set at data.shards_url is read as it is: prepared and uploaded before
        data_dir = Path(cfg.data.dir)
        with exclusive(data_dir.with_name(f".{data_dir.name}.lock")):
            prepare(cfg)
    data = ShardDataModule(cfg, fault_log=run_dir / ".data_faults")  # data.on_error=skip: what each rank skipped
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold, len(data.actions))
    module.model.item_tower.set_catalogue(data.catalogue.tokens, data.catalogue.lengths)

    t = cfg.trainer
    resume = resolve_resume(t.resume, run_dir)
    if resume is None:
        data.forget_faults()
        if t.init_weights is not None:
            load_initial_weights(module, t.init_weights, data.num_items)
    trainer, checkpoint = build_trainer(cfg, run_dir, build_loggers(cfg, run_dir, resuming=resume is not None), t.max_epochs)
    for logger in trainer.loggers:
        logger.log_metrics(parameter_counts(module), step=0)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except SIGTERMException:
        log.warning(f"stopped by SIGTERM at step {trainer.global_step}; saved {run_dir / 'checkpoints' / INTERRUPTED}; "
                    "the same command with trainer.resume=auto continues")
        raise SystemExit(128 + signal.SIGTERM)

    summary: dict[str, float] = {"best/" + MONITOR: float(checkpoint.best_model_score or float("nan"))}
    best = test_checkpoint(trainer, checkpoint.best_model_path or None, run_dir)
    for split in ("test", "cold_valid", "cold"):
        if not data.manifest["counts"].get(split):  # empty, or absent (cold_valid of data prepared before the cut)
            continue
        module.test_split = data.test_split = split
        model_metrics = trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)[0]
        baseline = popularity_metrics(data, split, trainer)
        summary.update(model_metrics)
        summary.update({f"popularity/{k}": v for k, v in baseline.items()})
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
        log.info(f"run folder: {run_dir}  ({summary['wall_s']:.0f}s)")
    return summary
