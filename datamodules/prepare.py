"""`twotower prepare`: raw interactions + item catalogue -> WebDataset shards + manifest.json.

Output is built in a temporary sibling folder and renamed into place at the end, so a failed
prepare never leaves a half-written shard set (and an existing good one stays until replaced)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from configs.schema import Config, DataConfig
from datamodules import readers, synthetic
from datamodules.item_text import item_texts, load_tokenizer, tokenize, tokenizer_fingerprint
from datamodules.shards import write_shards
from datamodules.split import EvalCase, leave_one_out

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test", "cold")


def _input_files(data: DataConfig) -> list[Path]:
    if data.source == "table":
        return [Path(data.interactions), Path(data.items)]
    if data.source == "movielens":
        return sorted(p for p in Path(data.path).glob("*") if p.is_file())
    return []


def fingerprint(cfg: Config) -> str:
    """What the shards depend on: data source and its files, text, split and tokenizer."""
    data = asdict(cfg.data)
    for loader_only in ("batch_size", "eval_batch_size", "shuffle_buffer", "num_workers", "max_len", "dir", "name"):
        data.pop(loader_only)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _input_files(cfg.data) if p.exists()]
    key = json.dumps([SCHEMA_VERSION, data, asdict(cfg.split), cfg.model.item.encoder, files], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_raw(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Interactions and items of the configured source, checked against each other."""
    if data.source == "synthetic":
        interactions, items = synthetic.generate(data.synthetic)
        return interactions, items, {}
    if data.source == "movielens":
        interactions, items, skipped = readers.read_movielens(data.path, data.on_bad_row)
        inter_path, items_path = Path(data.path), Path(data.path)
    else:
        interactions, skipped = readers.read_interactions(data.interactions, data.columns, data.on_bad_row)
        items, skipped_items = readers.read_items(data.items, data.item_id_column, data.text_fields, data.on_bad_row)
        skipped = {k: skipped.get(k, 0) + skipped_items.get(k, 0) for k in skipped.keys() | skipped_items.keys()}
        inter_path, items_path = data.interactions, data.items
    missing = [f for f in data.text_fields if f not in items.columns]
    if missing:
        raise readers.DataError(f"{items_path}: text field(s) {missing} (data.text_fields) not found; columns are: {', '.join(items.columns)}")
    interactions, unknown = readers.check_consistency(interactions, items, inter_path, items_path, data.on_bad_row)
    for key, count in unknown.items():
        skipped[key] = skipped.get(key, 0) + count
    return interactions, items, skipped


def _eval_samples(cases: list[EvalCase]):
    for n, case in enumerate(cases):
        yield {"__key__": f"{n:09d}", "history.npy": case.history.astype(np.int32),
               "json": {"user_id": case.user_id, "target": case.target}}


def prepare(cfg: Config, force: bool = False) -> Path:
    """Prepare `cfg.data.dir` unless it already holds shards of the same fingerprint."""
    out = Path(cfg.data.dir)
    key = fingerprint(cfg)
    manifest = read_manifest(out)
    if manifest and manifest.get("fingerprint") == key and not force:
        print(f"prepare: {out} is up to date ({manifest['counts']['train_users']} training users)")
        return out

    started = time.time()
    interactions, items, skipped = load_raw(cfg.data)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    split = leave_one_out(interactions, item_index, cfg.split)
    if not split.train:
        raise readers.DataError(f"no user has {cfg.split.min_interactions} or more interactions with warm items: nothing to train on")

    tokenizer = load_tokenizer(cfg.model.item.encoder)
    texts = item_texts(items, cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shards = {}
        item_samples = ({"__key__": f"{i:09d}", "tokens.npy": tokens[i], "txt": texts[i],
                         "json": {"index": i, "item_id": str(items["item_id"].iat[i]),
                                  "train_count": int(split.train_counts[i]), "cold": bool(split.cold_items[i])}}
                        for i in range(len(items)))
        shards["items"] = write_shards(tmp / "items", "items", tqdm(item_samples, total=len(items), desc="items"), cfg.data.shard_max_count)
        train_samples = ({"__key__": f"{n:09d}", "seq.npy": seq.astype(np.int32), "json": {"user_id": user}}
                         for n, (user, seq) in enumerate(split.train))
        shards["train"] = write_shards(tmp / "train", "train", tqdm(train_samples, total=len(split.train), desc="train"), cfg.data.shard_max_count)
        for name in ("valid", "test", "cold"):
            cases = getattr(split, name)
            shards[name] = write_shards(tmp / name, name, tqdm(_eval_samples(cases), total=len(cases), desc=name), cfg.data.shard_max_count)
        (tmp / "item_ids.json").write_text(json.dumps([str(i) for i in items["item_id"]]))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": key,
            "source": cfg.data.source,
            "counts": {
                "interactions": int(len(interactions)),
                "users": int(interactions["user_id"].nunique()),
                "items": int(len(items)),
                "train_users": len(split.train),
                "train_events": int(split.train_counts.sum()),
                "valid": len(split.valid), "test": len(split.test), "cold": len(split.cold),
                "cold_items": int(split.cold_items.sum()),
                "dropped_users": split.dropped_users,
            },
            "item_ids": "item_ids.json",
            "tokenizer": {"encoder": cfg.model.item.encoder, "sha256": tokenizer_fingerprint(tokenizer), "max_text_len": cfg.data.max_text_len},
            "text_fields": list(cfg.data.text_fields),
            "split": {"protocol": "leave-one-out by time (ties keep file order)", **asdict(cfg.split)},
            "skipped": skipped,
            "shards": {name: [f"{name}/{s}" for s in files] for name, files in shards.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepare: wrote {out} in {time.time() - started:.1f}s: {manifest['counts']}")
    return out


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with `tmp`; the old folder is removed only once the new one is in place."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
