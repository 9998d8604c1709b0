"""`twotower export`: a Lightning checkpoint -> a self-contained folder that serves without
Lightning (layout in `twotower.serving.export_format`): the towers, the item vectors and a FAISS index."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from twotower.configs import Config
from twotower.configs.serving import ServingConfig
from twotower.datamodules.datamodule import ShardDataModule
from twotower.modules.item_text import load_tokenizer
from twotower.serving.export_format import Exported, write_exported
from twotower.serving.item_index import build_index
from twotower.trainers.evaluate import accelerator_device, load_module

log = logging.getLogger(__name__)


def export(cfg: Config, checkpoint: str, out: str | Path, serving: ServingConfig) -> Path:
    """Restore `checkpoint` on the catalogue of `cfg.data.dir`, encode every item on the device of
    `cfg.trainer.accelerator` (`accelerator_device`; in float32) and write the folder: the model
    (the checkpoint's weights) and the vectors back on the CPU. One process, one device: no
    process group, so `catalogue_vectors` encodes every item here (it splits the items only
    across the ranks of a running process group, as in validation)."""
    device = accelerator_device(cfg.trainer.accelerator)  # before any work: a missing GPU fails here, clearly
    data = ShardDataModule(cfg)
    module = load_module(checkpoint, data)
    model, trained = module.model, module.cfg  # the checkpoint's own config describes its model
    try:
        model.to(device)
        with torch.inference_mode():
            vectors = model.catalogue_vectors(trained.eval.item_batch_size).float().cpu().contiguous()
    finally:
        model.to("cpu")  # the same values: float32 copies both ways
    exported = Exported(
        cfg=trained, model=model, item_ids=list(data.catalogue.item_ids), texts=list(data.catalogue.texts),
        vectors=vectors, index=build_index(vectors.numpy(), serving),
        tokenizer=load_tokenizer(trained.model.item.encoder) if model.item_tower.uses_text else None,
        actions=list(data.actions),
    )
    out = write_exported(Path(out), exported, checkpoint)
    log.info(f"wrote {out}: {len(exported.item_ids)} items, dim {vectors.shape[1]}, "
             f"mode {trained.model.mode}, index {type(exported.index).__name__}")
    return out
