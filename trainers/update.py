"""`twotower update`: keep a trained model current. Continue training a checkpoint on the data that
`prepare --append` added (new events, new users, new items), with a replay share of older users'
sequences against forgetting; keep the result only if it ranks the new window's validation users
better than the stale model; optionally re-export it, so a running `twotower serve` on that folder
swaps to it.

    twotower prepare --append data.since=T        # the new interactions (and items) into data.dir
    twotower update --checkpoint runs/x/checkpoints/best.ckpt --export runs/x/export

Both models are ranked on the same users with the same code: `valid_window` picks the model,
`test_window` (each new-window user's newest event) reports it."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from twotower.configs import Config, to_yaml
from twotower.datamodules.datamodule import ShardDataModule
from twotower.files import write_json, write_text
from twotower.trainers.evaluate import load_module, popularity_metrics
from twotower.trainers.export import export
from twotower.trainers.run_folder import plot_curves
from twotower.trainers.trainer_setup import MONITOR, build_loggers, build_trainer, test_checkpoint

log = logging.getLogger(__name__)

SPLITS = ("valid_window", "test_window")


def default_out(checkpoint: str | Path, window_round: int) -> Path:
    """`RUN_DIR/updates/round-N` for a checkpoint `RUN_DIR/checkpoints/*.ckpt`."""
    return Path(checkpoint).resolve().parent.parent / "updates" / f"round-{window_round}"


def _rank(trainer: pl.Trainer, module, data: ShardDataModule, split: str, ckpt_path: str | None = None) -> dict[str, float]:
    module.test_split = data.test_split = split
    return trainer.test(module, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]


def update(cfg: Config, checkpoint: str, out: str | Path | None = None, export_to: str | Path | None = None) -> dict:
    """Update `checkpoint` on `cfg.data.dir`'s newest appended window; returns the summary."""
    started = time.time()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.update.lr is not None:
        cfg = replace(cfg, trainer=replace(cfg.trainer, lr=cfg.update.lr))
    data = ShardDataModule(cfg, window=True)
    window = data.manifest["window"]
    run_dir = Path(out) if out else default_out(checkpoint, window["round"])
    module = load_module(checkpoint, data, cfg, new_items=True).train()  # Lightning keeps the mode it finds
    cfg = module.cfg
    write_text(run_dir / "config.yaml", to_yaml(cfg))

    trainer, best = build_trainer(cfg, run_dir, build_loggers(cfg, run_dir), cfg.update.epochs)
    stale = {split: _rank(trainer, module, data, split) for split in SPLITS}
    trainer.fit(module, datamodule=data)
    best_path = test_checkpoint(trainer, best.best_model_path or None, run_dir)
    updated = {split: _rank(trainer, module, data, split, best_path) for split in SPLITS}

    stale_val = stale["valid_window"]["valid_window/ndcg@10"]  # what MONITOR measures, on the window
    improved = best.best_model_score is not None and float(best.best_model_score) > stale_val
    summary: dict = {"window": window, "checkpoint": str(Path(checkpoint).resolve()),
                     "kept": "updated" if improved else "stale", "best_checkpoint": best_path}
    for name, metrics in (("stale", stale), ("updated", updated)):
        for split_metrics in metrics.values():
            summary.update({f"{name}/{k}": v for k, v in split_metrics.items()})
    baseline = popularity_metrics(data, "test_window", trainer)
    summary.update({f"popularity/{k}": v for k, v in baseline.items()})
    summary.update(wall_s=time.time() - started, epochs=trainer.current_epoch, steps=trainer.global_step)

    exported = None
    if export_to and improved:
        exported = export(cfg, best_path, export_to, cfg.serving)
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
        if not improved:
            log.info(f"no gain on valid_window ({MONITOR} stale {stale_val:.4f}, updated {float(best.best_model_score or 0):.4f}): "
                     "keeping the stale model" + (f"; {export_to} left as it was" if export_to else ""))
        elif exported:
            log.info(f"exported the updated model to {exported}")
        log.info(f"run folder: {run_dir}  ({summary['wall_s']:.0f}s)")
    return summary
