"""The exported model folder: its layout, writing it (`twotower export` and `update --export` call
`write_exported`) and reading it back (`load_exported`).

Reading needs torch, transformers, safetensors and faiss, but neither Lightning nor DeepSpeed, so
a serving machine installs only what inference needs. Layout of `DIR/`:

    config.yaml               the resolved training config (model, text fields, max_len ...)
    export.json               format version, export id, source checkpoint, counts, index type, action values
    item_encoder/             the item tower's BERT (`save_pretrained`) and its tokenizer (text modes)
    towers.safetensors        every other weight: projection, ID embeddings, user tower
    item_ids.json             item index -> item id
    item_texts.json           item index -> the text the item tower read
    item_tokens.safetensors   `tokens` [N, T] int32 (right-padded) and `lengths` [N], as prepared
    item_vectors.safetensors  `vectors` [N, d] float32: f(item) of every catalogue item
    items.faiss               FAISS inner-product index over those vectors (label = item index)
"""
from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from twotower.configs import Config, from_container, to_yaml
from twotower.files import atomic_folder
from twotower.modules.item_text import load_tokenizer
from twotower.modules.two_tower import TwoTower

FORMAT_VERSION = 1
ENCODER_PREFIX = "item_tower.encoder."
"State-dict keys of the BERT, which lives in `item_encoder/` instead of `towers.safetensors`."


@dataclass
class Exported:
    cfg: Config
    model: TwoTower
    "In eval mode, its catalogue tokens set (so `catalogue_vectors` works)."
    item_ids: list[str]
    texts: list[str]
    vectors: torch.Tensor
    "[N, d] float32, what `model.catalogue_vectors` gave at export time."
    index: faiss.Index
    tokenizer: PreTrainedTokenizerBase | None
    "The item tower's tokenizer; None in id mode."
    export_id: str = ""
    "A fresh id per written export (in export.json): a server watching the folder reloads when it changes."
    actions: list[str] = field(default_factory=list)
    "The action values coded 1, 2, ... (the data's manifest.json `actions`)."


def write_exported(out: str | Path, exported: Exported, checkpoint: str, extra: dict | None = None) -> Path:
    """Write `exported` to a temporary sibling of `out`, then rename it into place (an existing
    folder is replaced only once the new one is complete and on disk). `extra`: more fields for
    export.json (`twotower learn` records the stream offsets the model has learnt up to)."""
    out = Path(out)
    with atomic_folder(out) as tmp:
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
                "actions": exported.actions, **(extra or {})}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        for path in tmp.rglob("*"):  # readable by a serving user other than the exporter
            path.chmod(0o755 if path.is_dir() else 0o644)
    return out


@contextmanager
def _quiet_transformers():
    """Silence the load report and progress bar of `from_pretrained`: the exported encoder has no
    pooler weights because `ItemTower` drops the pooler, so "pooler MISSING" is expected."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_exported(folder: str | Path, cfg: Config | None = None) -> Exported:
    """Rebuild the model and catalogue from an export folder. `cfg` defaults to its config.yaml
    (the CLI passes that file merged with `-c` files and overrides)."""
    folder = Path(folder)
    meta_path = folder / "export.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder}: not an exported model (no export.json); write one with `twotower export`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: export format {meta.get('format_version')}, this twotower reads {FORMAT_VERSION}")
    cfg = cfg or from_container(OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")))
    item_ids = json.loads((folder / "item_ids.json").read_text())
    uses_text = "text" in cfg.model.mode
    if uses_text:
        cfg.model.item.encoder = str(folder / "item_encoder")  # the exported (fine-tuned) encoder
    actions = meta.get("actions", [])
    with _quiet_transformers():
        model = TwoTower(cfg.model, len(item_ids), len(actions))
    loaded = model.load_state_dict(load_file(folder / "towers.safetensors"), strict=False)
    missing = [k for k in loaded.missing_keys if not k.startswith(ENCODER_PREFIX)]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{folder}/towers.safetensors does not match model.mode={cfg.model.mode}: "
                         f"missing {missing[:5]}, unexpected {loaded.unexpected_keys[:5]}")
    tokens = load_file(folder / "item_tokens.safetensors")
    model.item_tower.set_catalogue(tokens["tokens"], tokens["lengths"])
    model.requires_grad_(False).eval()
    return Exported(
        cfg=cfg, model=model, item_ids=item_ids,
        texts=json.loads((folder / "item_texts.json").read_text()),
        vectors=load_file(folder / "item_vectors.safetensors")["vectors"],
        index=faiss.read_index(str(folder / "items.faiss")),
        tokenizer=load_tokenizer(str(folder / "item_encoder")) if uses_text else None,
        export_id=meta.get("export_id", ""), actions=actions,
    )
