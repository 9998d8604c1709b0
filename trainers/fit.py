"""`twotower fit`: prepare (if needed) -> data -> model -> loggers and callbacks -> Trainer.fit
-> test (and cold) on the best checkpoint -> run folder (summary.json, curves, table)."""
from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from configs import Config, to_yaml
from datamodules.datamodule import ShardDataModule
from datamodules.prepare import prepare
from modules.lit_two_tower import TwoTowerModule
from trainers.evaluate import popularity_metrics
from trainers.run_folder import metrics_table, plot_curves, write_atomic, write_json

MONITOR = "val/ndcg@10"


def parameter_counts(module: TwoTowerModule) -> dict[str, int]:
    towers = {"item_tower": module.model.item_tower, "user_tower": module.model.user_tower}
    counts = {"params/total": sum(p.numel() for p in module.parameters())}
    for name, tower in towers.items():
        counts[f"params/{name}"] = sum(p.numel() for p in tower.parameters())
        counts[f"params/{name}_trainable"] = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    return counts


def build_loggers(cfg: Config, run_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb = cfg.logger.wandb
    if wandb.mode != "disabled":
        loggers.append(WandbLogger(name=cfg.run.name, project=wandb.project, entity=wandb.entity, group=wandb.group,
                                   tags=list(wandb.tags), mode=wandb.mode, save_dir=str(run_dir),
                                   config=OmegaConf.to_container(OmegaConf.structured(cfg))))
    return loggers


def fit(cfg: Config) -> dict[str, float]:
    started = time.time()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run.dir)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))

    prepare(cfg)
    data = ShardDataModule(cfg)
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold)
    module.model.item_tower.set_catalogue(data.catalogue.tokens, data.catalogue.lengths)

    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR, mode="max", save_last=True)
    callbacks = [checkpoint]
    if cfg.trainer.patience:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.trainer.patience))
    loggers = build_loggers(cfg, run_dir)
    t = cfg.trainer
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, max_epochs=t.max_epochs,
        max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val or None,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir), enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=False,
    )
    for logger in loggers:
        logger.log_metrics(parameter_counts(module), step=0)
    trainer.fit(module, datamodule=data)

    summary: dict[str, float] = {"best/" + MONITOR: float(checkpoint.best_model_score or float("nan"))}
    rows = {}
    for split in ("test", "cold"):
        if not data.manifest["counts"][split]:
            continue
        module.test_split = data.test_split = split
        model_metrics = trainer.test(module, datamodule=data, ckpt_path=checkpoint.best_model_path or None, verbose=False)[0]
        baseline = popularity_metrics(data, split)
        summary.update(model_metrics)
        summary.update({f"popularity/{k}": v for k, v in baseline.items()})
        rows[f"{cfg.model.mode} ({split})"] = {k.split("/", 1)[1]: v for k, v in model_metrics.items()}
        rows[f"popularity ({split})"] = {k.split("/", 1)[1]: v for k, v in baseline.items()}
    summary["wall_s"] = time.time() - started
    summary["epochs"] = trainer.current_epoch
    summary["steps"] = trainer.global_step
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
        print(f"\n{metrics_table(rows, cfg.eval.ks)}\n\nrun folder: {run_dir}  ({summary['wall_s']:.0f}s)")
    return summary
