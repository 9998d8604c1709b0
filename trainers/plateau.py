"""`trainer.lr_plateau_patience`: the learning rate is cut (torch's ReduceLROnPlateau) each time
validation has not improved for that many validations, and training goes on from the best weights
so far with fresh optimizer moments: in one run, what a second run from the first's best
checkpoint at a lower rate does (`trainer.init_weights`, README "Fine-tuning at convergence").
Going on from the last weights instead, past the best by the patience's worth of over-fitting,
gained nothing on amazon-office (README)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from twotower.modules.lit_two_tower import MONITOR
from twotower.trainers.checkpoints import consolidate_checkpoint


class PlateauSchedule(Callback):
    """Steps the schedule on every validation, before ModelCheckpoint (which Lightning runs last)
    writes last.ckpt, so that checkpoint holds the cut rate and the restored weights, and a run
    resumed from it goes on as the uninterrupted one does. The schedule's own state (best score,
    flat validations) travels in the checkpoint as this callback's."""

    def __init__(self, patience: int, factor: float) -> None:
        self.patience, self.factor = patience, factor
        self.schedule: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self.restored: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            trainer.optimizers[0], mode="max", factor=self.factor, threshold=0.0,
            patience=self.patience - 1)  # torch cuts on the (patience + 1)-th flat validation
        if self.restored:
            self.schedule.load_state_dict(self.restored)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule is None or trainer.sanity_checking or MONITOR not in trainer.callback_metrics:
            return
        optimizer = trainer.optimizers[0]
        before = optimizer.param_groups[0]["lr"]
        self.schedule.step(float(trainer.callback_metrics[MONITOR]))
        best = trainer.checkpoint_callback.best_model_path  # a cut comes after a flat validation: written before it
        if optimizer.param_groups[0]["lr"] < before and best:
            pl_module.load_state_dict(consolidate_checkpoint(best)["state_dict"])
            optimizer.state.clear()

    def state_dict(self) -> dict:
        return self.schedule.state_dict() if self.schedule is not None else dict(self.restored or {})

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict
