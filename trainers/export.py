"""`twotower export`: a Lightning checkpoint -> a self-contained folder that serves without
Lightning (layout in `trainers.exported`): the towers, the item vectors and a FAISS index."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import faiss
import torch
from safetensors.torch import save_file

from configs import Config, to_yaml
from configs.serving import ServingConfig
from datamodules.datamodule import ShardDataModule
from datamodules.item_text import load_tokenizer
from datamodules.prepare import swap_into_place
from trainers.evaluate import load_module
from trainers.exported import ENCODER_PREFIX, FORMAT_VERSION, Exported
from trainers.item_index import build_index


def export(cfg: Config, checkpoint: str, out: str | Path, serving: ServingConfig) -> Path:
    """Restore `checkpoint` on the catalogue of `cfg.data.dir`, encode every item and write the folder."""
    data = ShardDataModule(cfg)
    module = load_module(checkpoint, data)
    model, trained = module.model, module.cfg  # the checkpoint's own config describes its model
    with torch.inference_mode():
        vectors = model.catalogue_vectors(trained.eval.item_batch_size).float().contiguous()
    exported = Exported(
        cfg=trained, model=model, item_ids=list(data.catalogue.item_ids), texts=list(data.catalogue.texts),
        vectors=vectors, index=build_index(vectors.numpy(), serving),
        tokenizer=load_tokenizer(trained.model.item.encoder) if model.item_tower.uses_text else None,
        actions=list(data.actions),
    )
    out = write_exported(Path(out), exported, checkpoint)
    print(f"export: wrote {out}: {len(exported.item_ids)} items, dim {vectors.shape[1]}, "
          f"mode {trained.model.mode}, index {type(exported.index).__name__}")
    return out


def write_exported(out: Path, exported: Exported, checkpoint: str) -> Path:
    """Write `exported` to a temporary sibling of `out`, then rename it into place (an existing
    folder is replaced only once the new one is complete)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model, item_tower = exported.model, exported.model.item_tower
        (tmp / "config.yaml").write_text(to_yaml(exported.cfg))
        if item_tower.uses_text:
            item_tower.encoder.save_pretrained(tmp / "item_encoder")
            exported.tokenizer.save_pretrained(tmp / "item_encoder")
        towers = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIX)}
        save_file(towers, tmp / "towers.safetensors")
        (tmp / "item_ids.json").write_text(json.dumps(exported.item_ids))
        (tmp / "item_texts.json").write_text(json.dumps(exported.texts))
        save_file({"tokens": item_tower.tokens.to(torch.int32).cpu().contiguous(), "lengths": item_tower.lengths.cpu().contiguous()},
                  tmp / "item_tokens.safetensors")
        save_file({"vectors": exported.vectors.cpu().contiguous()}, tmp / "item_vectors.safetensors")
        faiss.write_index(exported.index, str(tmp / "items.faiss"))
        meta = {"format_version": FORMAT_VERSION, "export_id": uuid.uuid4().hex, "checkpoint": str(Path(checkpoint).resolve()), "num_items": len(exported.item_ids),
                "dim": int(exported.vectors.shape[1]), "mode": exported.cfg.model.mode, "index": type(exported.index).__name__,
                "actions": exported.actions}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        for path in tmp.rglob("*"):  # readable by a serving user other than the exporter
            path.chmod(0o755 if path.is_dir() else 0o644)
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
