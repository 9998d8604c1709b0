"""Evaluation outside the training loop: restoring a checkpoint, and the popularity baseline
ranked with exactly the same protocol and code as the model."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from twotower.configs import Config, from_container
from twotower.datamodules.datamodule import ShardDataModule
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.modules.metrics import metrics_per_user, target_ranks
from twotower.trainers.checkpoints import consolidate_checkpoint


def accelerator_device(accelerator: str, cuda_available: bool | None = None) -> torch.device:
    """The one device that `trainer.accelerator` names for the single-device jobs (`evaluate`,
    `export`): cpu -> cpu; gpu (or cuda) -> cuda; auto -> cuda when CUDA is available, else cpu.
    A GPU asked for where there is none is an error, not a silent CPU run. `cuda_available`:
    default `torch.cuda.is_available()`."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    if accelerator in ("gpu", "cuda"):
        if not cuda_available:
            raise ValueError(f"trainer.accelerator={accelerator} asks for a GPU, but this machine has none that torch can use "
                             f"(torch.cuda.is_available() is False); set trainer.accelerator=cpu (or auto)")
        return torch.device("cuda")
    raise ValueError(f"trainer.accelerator={accelerator}: expected cpu, gpu or auto")


def load_module(checkpoint: str, data: ShardDataModule, cfg: Config | None = None, new_items: bool = False) -> TwoTowerModule:
    """A trained module from a Lightning checkpoint (a file, or a DeepSpeed folder), wired to the
    catalogue of `data`. Its config is the checkpoint's own, or `cfg` with the checkpoint's
    `model` section. `new_items`: the catalogue and the action values may have grown since
    (`prepare --append`, which keeps the codes given before); items past the trained ones get
    freshly initialised ID embeddings (their text vectors need nothing), new actions fresh
    action embeddings."""
    if not Path(checkpoint).exists():
        raise ValueError(f"checkpoint {checkpoint} not found (a .ckpt written by `twotower fit`)")
    state = consolidate_checkpoint(checkpoint)
    trained = from_container(state["hyper_parameters"]["config"])
    cfg = trained if cfg is None else replace(cfg, model=trained.model)
    trained_items = state["hyper_parameters"]["num_items"]
    if trained_items != data.num_items and not (new_items and trained_items < data.num_items):
        raise ValueError(f"{checkpoint}: trained on {trained_items} items, {data.folder} has {data.num_items}")
    trained_actions = state["hyper_parameters"].get("num_actions", 0)  # 0: trained before action codes existed
    actions = len(data.actions) if cfg.model.user.actions else trained_actions
    if actions != trained_actions and not (new_items and trained_actions < actions):
        raise ValueError(f"{checkpoint}: trained with {trained_actions} action codes, {data.folder} has {actions} "
                         f"({', '.join(data.actions[:10])}); the action feature needs the same codes")
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold, actions)
    weights = state["state_dict"]
    trained_rows = {"id_embedding.weight": trained_items, "user_tower.actions.weight": trained_actions + 1}  # + code 0
    for key, fresh in module.state_dict().items():
        rows = next((n for suffix, n in trained_rows.items() if key.endswith(suffix)), None)
        if rows is not None and key in weights and weights[key].shape[0] == rows < fresh.shape[0]:
            weights[key] = torch.cat([weights[key], fresh[rows:]])
    module.load_state_dict(weights)
    module.model.item_tower.set_catalogue(data.catalogue.tokens, data.catalogue.lengths)
    return module.eval()


def popularity_ranks(data: ShardDataModule, split: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """0-based rank of each `split` user's target (of this rank's share) when every user gets the
    same ranking: items by training popularity (the history filtered when eval.filter_seen)."""
    ev = data.cfg.eval
    counts = data.catalogue.train_counts.double()[:, None]  # score <1, count>: exact in float64
    ranks = [target_ranks(counts.new_ones(len(target), 1), counts, target, history.items if ev.filter_seen else None,
                          ev.score_chunk_size)[target >= 0]  # target -1: padding of a rank's share
             for history, target in data.eval_dataloader(split, 0, rank, world_size)]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def popularity_metrics(data: ShardDataModule, split: str, trainer: pl.Trainer | None = None) -> dict[str, float]:
    """The popularity baseline's metrics, averaged over the users of `split`. With a distributed
    `trainer`, each rank ranks its own share of the users and the sums are reduced over ranks."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    per_user = metrics_per_user(popularity_ranks(data, split, rank, world), data.cfg.eval.ks)
    names = sorted(per_user)
    sums = torch.tensor([per_user[n].sum().item() for n in names] + [float(len(per_user[names[0]]))], dtype=torch.float64)
    if world > 1:
        sums = trainer.strategy.reduce(sums.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    count = sums[-1].item()
    return {f"{split}/{n}": sums[i].item() / count if count else 0.0 for i, n in enumerate(names)}


def evaluate_checkpoint(cfg: Config, checkpoint: str, split: str) -> dict[str, float]:
    """Rank `split` with a checkpoint: the model's metrics (`{split}/...`) and the popularity
    baseline's (`popularity/{split}/...`), which the command line prints side by side. One device,
    `cfg.trainer.accelerator`'s (`accelerator_device`), at `cfg.trainer.precision` (ranking itself
    is float32 whatever the precision: `modules.metrics`)."""
    device = accelerator_device(cfg.trainer.accelerator)  # before any work: a missing GPU fails here, clearly
    data = ShardDataModule(cfg)
    module = load_module(checkpoint, data)
    module.test_split = split
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=cfg.trainer.precision,
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(module, dataloaders=data.eval_dataloader(split), verbose=False)[0]
    baseline = popularity_metrics(data, split)
    return {**metrics, **{f"popularity/{k}": v for k, v in baseline.items()}}
