"""`twotower prepare`: raw interactions + item catalogue -> WebDataset shards + manifest.json.

Output is built in a temporary sibling folder and renamed into place at the end, so a failed
prepare never leaves a half-written shard set (and an existing good one stays until replaced)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twotower.configs.schema import Config, DataConfig
from twotower.datamodules import amazon, readers, synthetic
from twotower.datamodules.partition import Written, write_partition
from twotower.datamodules.shards import write_shards
from twotower.datamodules.split import choose_cold_items, choose_cold_valid
from twotower.files import atomic_folder, write_json
from twotower.modules.item_text import (
    item_texts,
    load_tokenizer,
    tokenize,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"2: every sequence and history carries its items' times (`time.npy`) and action codes (`action.npy`)."
MAX_ACTIONS = 255
MANIFEST = "manifest.json"
EVENTS = "events.parquet"
"Every interaction prepared (user_id, item_id, timestamp, ...): what `prepare --append` adds to."
ITEMS = "items.parquet"
"The catalogue in item-index order (item_id and the text fields)."
SPLITS = ("train", "valid", "test", "cold_valid", "cold")


def _input_files(data: DataConfig) -> list[Path]:
    if data.source == "table":
        return [p for spec in (data.interactions, data.items) for p in readers.input_files(spec)]
    if data.source == "movielens":
        return sorted(p for p in Path(data.path).glob("*") if p.is_file())
    if data.source == "amazon":
        return [Path(data.reviews), Path(data.metadata)]
    return []


def fingerprint(cfg: Config) -> str:
    """What the shards depend on: data source and its files, text, split and tokenizer."""
    data = asdict(cfg.data)
    for loader_only in ("batch_size", "eval_batch_size", "shuffle_buffer", "num_workers", "max_len", "dir", "name", "on_error", "shards_url", "cache_dir",
                        "engine", "engine_address", "engine_partitions"):
        data.pop(loader_only)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _input_files(cfg.data) if p.exists()]
    split = asdict(cfg.split)
    if not cfg.split.cold_item_fraction:  # nothing held out, nothing to cut: shards prepared before the cut stay current
        split.pop("cold_valid_share")
    key = json.dumps([SCHEMA_VERSION, data, split, cfg.model.item.encoder, files], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_raw(data: DataConfig, base_items: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Interactions and items of the configured source, checked against each other. With
    `base_items` (append mode: the catalogue prepared before), the items are that catalogue merged
    with the source's (`merge_items`), and new interactions may name any item of either."""
    if data.source == "synthetic":
        interactions, items = synthetic.generate(data.synthetic)
        return interactions, items, {}
    if data.source == "movielens":
        interactions, items, skipped = readers.read_movielens(data.path, data.on_bad_row)
        inter_path, items_path = Path(data.path), Path(data.path)
    elif data.source == "amazon":
        interactions, items, skipped = amazon.read_amazon(data.reviews, data.metadata, data.on_bad_row)
        inter_path, items_path = data.reviews, data.metadata
    else:
        interactions, skipped = readers.read_interactions(data.interactions, data.columns, data.on_bad_row)
        items, skipped_items = readers.read_items(data.items, data.item_id_column, data.text_fields, data.on_bad_row)
        skipped = {k: skipped.get(k, 0) + skipped_items.get(k, 0) for k in skipped.keys() | skipped_items.keys()}
        inter_path, items_path = data.interactions, data.items
    missing = [f for f in data.text_fields if f not in items.columns]
    if missing:
        raise readers.DataError(f"{items_path}: text field(s) {missing} (data.text_fields) not found; columns are: {', '.join(items.columns)}")
    if base_items is not None:
        items = merge_items(base_items, items, data.text_fields)
    interactions, unknown = readers.check_consistency(interactions, items, inter_path, items_path, data.on_bad_row)
    for key, count in unknown.items():
        skipped[key] = skipped.get(key, 0) + count
    return interactions, items, skipped


def merge_items(base: pd.DataFrame, new: pd.DataFrame, fields: list[str]) -> pd.DataFrame:
    """The prepared catalogue `base` with `new` items: every base item keeps its index (so trained
    ID embeddings stay valid) and takes its text from `new` when `new` has it; ids only in `new`
    are appended in their file order."""
    new = new[["item_id", *fields]].astype({"item_id": str})
    merged = pd.concat([base[["item_id", *fields]], new[~new["item_id"].isin(base["item_id"])]], ignore_index=True)
    newer = new.set_index("item_id")
    known = merged["item_id"].isin(newer.index).to_numpy()
    merged.loc[known, fields] = newer.loc[merged.loc[known, "item_id"], fields].to_numpy()
    return merged


def time_slice(interactions: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """The interactions in [data.since, data.until)."""
    keep = np.ones(len(interactions), dtype=bool)
    if data.since is not None:
        keep &= interactions["timestamp"].to_numpy() >= data.since
    if data.until is not None:
        keep &= interactions["timestamp"].to_numpy() < data.until
    return interactions[keep]


def action_codes(interactions: pd.DataFrame, data: DataConfig, known: list[str] = ()) -> tuple[np.ndarray, list[str], str | None]:
    """(each interaction's action code, the values coded 1, 2, ..., the column read) as `data.actions`
    says; code 0 means no action (also where the value is missing: an empty event, an empty rating). Values are the event names, or the ratings written as numbers
    ("4", "4.5"); `known` (a catalogue prepared before) keeps its codes, new values come after."""
    column = data.actions
    if column == "auto":
        column = next((c for c in ("event", "rating") if c in interactions.columns), "none")
    if column == "none":
        return np.zeros(len(interactions), dtype=np.int16), [], None
    if column not in interactions.columns:
        raise readers.DataError(f"data.actions={column}: the interactions have no {column} column "
                                f"(columns: {', '.join(c for c in interactions.columns if c != 'line')})")
    values = interactions[column]
    present = values.notna() if column == "rating" else values.astype(str).str.strip() != ""  # missing: code 0
    values = values[present]
    names = values.map(lambda v: f"{v:g}") if column == "rating" else values.astype(str)
    order = sorted(names.unique(), key=float) if column == "rating" else sorted(names.unique())
    given = set(known)
    vocabulary = list(known) + [v for v in order if v not in given]
    if len(vocabulary) > MAX_ACTIONS:
        raise readers.DataError(f"data.actions={column}: {len(vocabulary)} distinct values in the {column} column, at most "
                                f"{MAX_ACTIONS} can be action codes; set data.actions=none (or another column)")
    codes = np.zeros(len(interactions), dtype=np.int16)
    codes[present.to_numpy()] = pd.Series(np.arange(1, len(vocabulary) + 1, dtype=np.int16), index=vocabulary).loc[names].to_numpy()
    return codes, vocabulary, column


def item_sample(index: int, item_id: str, tokens: np.ndarray, text: str, train_count: int, cold: bool) -> dict:
    return {"__key__": f"{index:09d}", "tokens.npy": tokens, "txt": text,
            "json": {"index": index, "item_id": item_id, "train_count": train_count, "cold": cold}}


def event_tables(manifest: dict) -> list[str]:
    """The manifest's event tables, one per prepare or append round in round order, relative to its folder."""
    events = manifest.get("events", EVENTS)
    return [events] if isinstance(events, str) else list(events)


def partition_frame(interactions: pd.DataFrame, item_index: pd.Series, codes: np.ndarray, round_: int) -> pd.DataFrame:
    """`interactions` as `datamodules.partition`'s frame (its input order: `file` and `line` where
    the readers gave them, else the row order)."""
    n = len(interactions)
    return pd.DataFrame({
        "user": interactions["user_id"].astype(str).to_numpy(),
        "item": item_index.loc[interactions["item_id"]].to_numpy(),
        "time": interactions["timestamp"].to_numpy(dtype=np.float64),
        "action": codes.astype(np.int16),
        "round": np.full(n, round_, dtype=np.int32),
        "file": interactions["file"].to_numpy() if "file" in interactions else np.zeros(n, dtype=np.int32),
        "line": interactions["line"].to_numpy() if "line" in interactions else np.arange(1, n + 1),
    })


def prepare(cfg: Config, force: bool = False) -> Path:
    """Prepare `cfg.data.dir` unless it already holds shards of the same fingerprint (also when
    `prepare --append` has added to them since)."""
    out = Path(cfg.data.dir)
    key = fingerprint(cfg)
    manifest = read_manifest(out)
    if manifest and manifest.get("fingerprint") == key and not force:
        appended = f", plus {len(manifest['appends'])} append(s)" if manifest.get("appends") else ""
        log.info(f"{out} is up to date ({manifest['counts']['train_users']} training users{appended})")
        return out
    if cfg.data.engine == "ray":
        from twotower.datamodules import engine

        return engine.prepare(cfg, key)
    started = time.time()
    interactions, items, skipped = load_raw(cfg.data)
    log.info(f"read {len(interactions):,} interactions and {len(items):,} items ({cfg.data.source}) in {time.time() - started:.1f}s")
    interactions = time_slice(interactions, cfg.data)
    codes, actions, action_column = action_codes(interactions, cfg.data)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    frame = partition_frame(interactions, item_index, codes, 0)
    cold_items = choose_cold_items(np.unique(frame["item"].to_numpy()), len(items), cfg.split)
    cold_valid = choose_cold_valid(cold_items, cfg.split)
    tokenizer = load_tokenizer(cfg.model.item.encoder)
    with atomic_folder(out) as tmp:
        written = write_partition(frame, tmp, "", cold_items, cfg.split, cfg.data.shard_max_count, cold_valid_items=cold_valid)
        check_trainable(written, cfg)
        written.shards.update(write_items(tmp, items, written.counts(len(items)), cold_items, tokenizer, cfg, cold_valid))
        interactions.reset_index(drop=True).to_parquet(tmp / EVENTS)
        manifest = new_manifest(cfg, key, written, written.interactions, len(items), cold_items, tokenizer,
                                {"column": action_column, "values": actions}, skipped, [EVENTS], cold_valid)
        write_json(tmp / MANIFEST, manifest)
    log.info(f"wrote {out} in {time.time() - started:.1f}s: {manifest['counts']}")
    return out


def check_trainable(written: Written, cfg: Config) -> None:
    if not written.train_users:
        raise readers.DataError(f"no user has {cfg.split.min_interactions} or more interactions with warm items: nothing to train on")


def new_manifest(cfg: Config, key: str, written: Written, interactions: int, items: int, cold_items: np.ndarray,
                 tokenizer, actions: dict, skipped: dict[str, int], events: list[str], cold_valid: np.ndarray | None = None) -> dict:
    """manifest.json of a prepared folder (docs/data.md, "Shards"); `written`: all its shards;
    `cold_valid`: the held-out items of the `cold_valid` split (None: not cut, no such split)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": key,
        "source": cfg.data.source,
        "counts": {
            "interactions": int(interactions),
            "users": written.users,
            "items": int(items),
            "train_users": written.train_users,
            "train_samples": sum(written.shards["train"].values()),
            "train_events": int(sum(written.train_counts)),
            **{name: sum(files.values()) for name, files in written.shards.items() if name not in ("train", "items")},
            "cold_items": int(cold_items.sum()),
            **({"cold_valid_items": int(cold_valid.sum())} if cold_valid is not None else {}),
            "dropped_users": written.dropped_users,
        },
        "item_ids": "item_ids.json",
        "events": events,
        "items_table": ITEMS,
        "tokenizer": {"encoder": cfg.model.item.encoder, "sha256": tokenizer_fingerprint(tokenizer), "max_text_len": cfg.data.max_text_len},
        "text_fields": list(cfg.data.text_fields),
        "actions": actions,
        "split": {"protocol": "leave-one-out by time (ties keep input order)", **asdict(cfg.split)},
        "skipped": skipped,
        "shards": {name: list(files) for name, files in written.shards.items()},
        "shard_counts": {path: n for files in written.shards.values() for path, n in files.items()},
    }


def items_table(items: pd.DataFrame, fields: list[str], train_counts: np.ndarray, cold_items: np.ndarray,
                cold_valid: np.ndarray | None) -> pd.DataFrame:
    """items.parquet: the catalogue with each item's training count, held-out flag and (where the
    held-out items are cut in two) whether it is of the `cold_valid` half: what an append starts from."""
    table = items[["item_id", *fields]].astype({"item_id": str}).assign(train_count=train_counts, cold=cold_items)
    return table if cold_valid is None else table.assign(cold_valid=cold_valid)


def held_out(base_items: pd.DataFrame, num_items: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(held-out items, their cold_valid half or None) of a prepared catalogue (items.parquet),
    grown to `num_items`: an append keeps both as first drawn, and never holds out a new item. A
    catalogue prepared before the cut has no `cold_valid` column: it stays uncut (all in `cold`)."""
    new = np.zeros(num_items - len(base_items), dtype=bool)
    cold = np.r_[base_items["cold"].to_numpy(dtype=bool), new]
    cold_valid = np.r_[base_items["cold_valid"].to_numpy(dtype=bool), new] if "cold_valid" in base_items else None
    return cold, cold_valid


def write_items(folder: Path, items: pd.DataFrame, train_counts: np.ndarray, cold_items: np.ndarray, tokenizer,
                cfg: Config, cold_valid: np.ndarray | None = None) -> dict[str, dict[str, int]]:
    """The item shards, items.parquet (`items_table`) and item_ids.json, under `folder`."""
    texts = item_texts(items.to_dict("records"), cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len, progress="tokenise")
    ids = items["item_id"].astype(str).tolist()
    samples = (item_sample(i, ids[i], tokens[i], texts[i], int(train_counts[i]), bool(cold_items[i])) for i in range(len(items)))
    written = write_shards(folder / "items", "items", tqdm(samples, total=len(items), desc="items", disable=len(items) < 10_000),
                           cfg.data.shard_max_count)
    items_table(items, cfg.data.text_fields, train_counts, cold_items, cold_valid).to_parquet(folder / ITEMS)
    write_json(folder / "item_ids.json", ids)
    return {"items": {f"items/{name}": n for name, n in written.items()}}


def event_rounds(manifest: dict) -> list[tuple[str, int]]:
    """(event table, its round) of a prepared folder: round 0 for the first prepare's tables,
    N for those of `appends/rNNNN/`."""
    return [(t, int(t.split("/")[1][1:]) if t.startswith("appends/") else 0) for t in event_tables(manifest)]


def append_checks(cfg: Config, out: Path, manifest: dict | None, key: str) -> dict | None:
    """The manifest to append to, or None when this data was appended already (nothing to do)."""
    if manifest is None:
        raise readers.DataError(f"{out}: nothing to append to (no {MANIFEST}); run `twotower prepare` first")
    tables = [out / t for t in event_tables(manifest)] + [out / manifest.get("items_table", ITEMS)]
    if not all(t.is_file() for t in tables):
        raise readers.DataError(f"{out}: prepared without {EVENTS}/{ITEMS} (an older twotower); prepare it again with --force first")
    if "cold" not in pq.read_schema(tables[-1]).names:
        raise readers.DataError(f"{tables[-1]}: no `cold` column (prepared by an older twotower); prepare it again with --force first")
    if key == manifest["fingerprint"] or key in [a["fingerprint"] for a in manifest.get("appends", [])]:
        log.info(f"{out} already holds this data (fingerprint {key}); nothing to append")
        return None
    if manifest["tokenizer"]["encoder"] != cfg.model.item.encoder or manifest["text_fields"] != list(cfg.data.text_fields):
        raise readers.DataError(f"{out}: prepared with encoder {manifest['tokenizer']['encoder']!r} and text fields "
                                f"{manifest['text_fields']}; append with the same model.item.encoder and data.text_fields")
    return manifest


def prepare_append(cfg: Config) -> Path:
    """Add the interactions (and items) of the configured source to the data already prepared in
    `cfg.data.dir`, typically a later time window (`data.since`). Existing training shards stay as
    they are: the new round (`appends/rNNNN/`) holds, for each user with new training cases, a
    sequence whose targets are exactly those cases (the user's older items come along as history
    context), so that the old and new training shards together hold the training cases of a fresh
    prepare of all the events. The evaluation splits, the item shards and tables are written anew
    for all users (with `valid_window` / `test_window` for the users active in the window: what
    `twotower update` trains and evaluates on); item indices of the existing catalogue do not
    change, and held-out (cold) items stay as drawn the first time, each in the half (`cold_valid` or
    `cold`) it was cut into (new items are never held out).
    The new manifest is written last; then what it no longer lists is removed. Appending the same
    data twice is a no-op."""
    out = Path(cfg.data.dir)
    key = fingerprint(cfg)
    manifest = append_checks(cfg, out, read_manifest(out), key)
    if manifest is None:
        return out
    if cfg.data.engine == "ray":
        from twotower.datamodules import engine

        return engine.prepare(cfg, key, manifest)
    started = time.time()
    base_events = pd.concat([pd.read_parquet(out / t).assign(round=r) for t, r in event_rounds(manifest)], ignore_index=True)
    base_items = pd.read_parquet(out / manifest.get("items_table", ITEMS))
    new_events, items, skipped = load_raw(cfg.data, base_items)
    new_events = time_slice(new_events, cfg.data)
    if new_events.empty:
        raise readers.DataError(f"no new interactions to append (data.since={cfg.data.since}, data.until={cfg.data.until})")
    since = float(new_events["timestamp"].min())
    seen = pd.MultiIndex.from_frame(base_events[["user_id", "item_id", "timestamp"]])
    new_events = new_events[~pd.MultiIndex.from_frame(new_events[["user_id", "item_id", "timestamp"]]).isin(seen)]
    round_ = max(r for _, r in event_rounds(manifest)) + 1
    events = pd.concat([base_events, new_events.assign(round=round_)], ignore_index=True)
    codes, actions, action_column = action_codes(events, cfg.data, manifest.get("actions", {}).get("values", []))
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    frame = partition_frame(events, item_index, codes, 0).assign(round=events["round"].to_numpy())
    cold_items, cold_valid = held_out(base_items, len(items))
    tokenizer = load_tokenizer(cfg.model.item.encoder)
    prefix = f"appends/r{round_:04d}"
    with round_folder(out, prefix) as tmp:
        written = write_partition(frame, tmp, "", cold_items, cfg.split, cfg.data.shard_max_count, round_, since, cold_valid)
        written.shards.update(write_items(tmp, items, written.counts(len(items)), cold_items, tokenizer, cfg, cold_valid))
        new_events.drop(columns="round", errors="ignore").reset_index(drop=True).to_parquet(tmp / EVENTS)
    updated = appended_manifest(cfg, manifest, key, written, prefix, written.interactions, items, base_items, cold_items, tokenizer,
                                {"column": action_column, "values": actions}, skipped, [f"{prefix}/{EVENTS}"], since, cold_valid)
    write_json(out / MANIFEST, updated)
    remove_unlisted(out, manifest, updated)
    log.info(f"appended round {round_} to {out} in {time.time() - started:.1f}s: {written.window_sequences} new training "
             f"sequence(s), {updated['counts']}")
    return out


@contextmanager
def round_folder(out: Path, prefix: str) -> Iterator[Path]:
    """`atomic_folder` for an append's round folder; a failed first append also removes `appends/`,
    leaving the prepared folder as it was."""
    try:
        with atomic_folder(out / prefix) as tmp:
            yield tmp
    except BaseException:
        if (out / "appends").is_dir() and not any((out / "appends").iterdir()):
            (out / "appends").rmdir()
        raise


def appended_manifest(cfg: Config, manifest: dict, key: str, written: Written, prefix: str, interactions: int,
                      items: pd.DataFrame, base_items: pd.DataFrame, cold_items: np.ndarray, tokenizer, actions: dict,
                      skipped: dict[str, int], events: list[str], since: float, cold_valid: np.ndarray | None = None) -> dict:
    """`manifest` with the round written under `prefix` (`written`'s shards, relative to it): the
    earlier training shards and event tables, and this round's everything else."""
    round_ = int(prefix.rsplit("/r", 1)[1])
    written.shards = {name: {f"{prefix}/{path}": n for path, n in files.items()} for name, files in written.shards.items()}
    written.shards["train"] = {**{path: manifest["shard_counts"][path] for path in manifest["shards"]["train"]}, **written.shards["train"]}
    earlier = manifest.get("skipped", {})
    updated = new_manifest(cfg, manifest["fingerprint"], written, interactions, len(items), cold_items, tokenizer, actions,
                           {k: earlier.get(k, 0) + skipped.get(k, 0) for k in {*earlier, *skipped}}, [*event_tables(manifest), *events],
                           cold_valid)
    return {**updated, "source": manifest["source"], "split": manifest["split"],
            "item_ids": f"{prefix}/item_ids.json", "items_table": f"{prefix}/{ITEMS}",
            "appends": [*manifest.get("appends", []), {"fingerprint": key, "round": round_, "since": since,
                                                       "interactions": written.new_interactions, "new_items": int(len(items) - len(base_items))}],
            "window": {"since": since, "round": round_, "new_users": written.window_sequences}}


def remove_unlisted(out: Path, old: dict, new: dict) -> None:
    """Delete the files `old` listed and `new` does not (the superseded evaluation and item shards and
    tables); a crash before this leaves only unlisted files, which nothing reads."""
    def listed(manifest: dict) -> set[str]:
        return {*manifest["shard_counts"], *event_tables(manifest), manifest.get("items_table", ITEMS), manifest.get("item_ids", "item_ids.json")}
    gone = listed(old) - listed(new)
    for name in sorted(gone):
        (out / name).unlink(missing_ok=True)
    for folder in sorted({(out / name).parent for name in gone}, key=lambda p: -len(p.parts)):
        if folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
