"""`twotower prepare`: raw interactions + item catalogue -> WebDataset shards + manifest.json.

Output is built in a temporary sibling folder and renamed into place at the end, so a failed
prepare never leaves a half-written shard set (and an existing good one stays until replaced)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from twotower.configs.schema import Config, DataConfig
from twotower.datamodules import amazon, readers, synthetic
from twotower.datamodules.shards import write_shards
from twotower.datamodules.split import EvalCase, Events, leave_one_out
from twotower.files import atomic_folder
from twotower.modules.item_text import item_texts, load_tokenizer, tokenize, tokenizer_fingerprint

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"2: every sequence and history carries its items' times (`time.npy`) and action codes (`action.npy`)."
MAX_ACTIONS = 255
MANIFEST = "manifest.json"
EVENTS = "events.parquet"
"Every interaction prepared (user_id, item_id, timestamp, ...): what `prepare --append` adds to."
ITEMS = "items.parquet"
"The catalogue in item-index order (item_id and the text fields)."
SPLITS = ("train", "valid", "test", "cold")


def _input_files(data: DataConfig) -> list[Path]:
    if data.source == "table":
        return [Path(data.interactions), Path(data.items)]
    if data.source == "movielens":
        return sorted(p for p in Path(data.path).glob("*") if p.is_file())
    if data.source == "amazon":
        return [Path(data.reviews), Path(data.metadata)]
    return []


def fingerprint(cfg: Config) -> str:
    """What the shards depend on: data source and its files, text, split and tokenizer."""
    data = asdict(cfg.data)
    for loader_only in ("batch_size", "eval_batch_size", "shuffle_buffer", "num_workers", "max_len", "dir", "name", "on_error"):
        data.pop(loader_only)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _input_files(cfg.data) if p.exists()]
    key = json.dumps([SCHEMA_VERSION, data, asdict(cfg.split), cfg.model.item.encoder, files], sort_keys=True)
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


def _events_members(events: Events) -> dict:
    return {"time.npy": events.times.astype(np.float64), "action.npy": events.actions.astype(np.int16)}


def _eval_samples(cases: list[EvalCase]):
    for n, case in enumerate(cases):
        yield {"__key__": f"{n:09d}", "history.npy": case.history.astype(np.int32), **_events_members(case.events),
               "json": {"user_id": case.user_id, "target": case.target, "time": case.time}}


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
    started = time.time()
    interactions, items, skipped = load_raw(cfg.data)
    log.info(f"read {len(interactions):,} interactions and {len(items):,} items ({cfg.data.source}) in {time.time() - started:.1f}s")
    return _write(cfg, out, time_slice(interactions, cfg.data), items, skipped, key, started)


def prepare_append(cfg: Config) -> Path:
    """Add the interactions (and items) of the configured source to the data already prepared in
    `cfg.data.dir`, typically a later time window (`data.since`). The shards are rebuilt over all
    interactions with the same protocol; item indices of the existing catalogue do not change. The
    new window (from its earliest new interaction) gets `valid_window` / `test_window` splits, and
    training sequences of users active in it are marked new: what `twotower update` trains and
    evaluates on. Appending the same data twice is a no-op."""
    out = Path(cfg.data.dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise readers.DataError(f"{out}: nothing to append to (no {MANIFEST}); run `twotower prepare` first")
    if not (out / EVENTS).is_file() or not (out / ITEMS).is_file():
        raise readers.DataError(f"{out}: prepared without {EVENTS}/{ITEMS} (an older twotower); prepare it again with --force first")
    key = fingerprint(cfg)
    appends = manifest.get("appends", [])
    if key == manifest["fingerprint"] or key in [a["fingerprint"] for a in appends]:
        log.info(f"{out} already holds this data (fingerprint {key}); nothing to append")
        return out
    if manifest["tokenizer"]["encoder"] != cfg.model.item.encoder or manifest["text_fields"] != list(cfg.data.text_fields):
        raise readers.DataError(f"{out}: prepared with encoder {manifest['tokenizer']['encoder']!r} and text fields "
                                f"{manifest['text_fields']}; append with the same model.item.encoder and data.text_fields")
    started = time.time()
    base_events, base_items = pd.read_parquet(out / EVENTS), pd.read_parquet(out / ITEMS)
    new_events, items, skipped = load_raw(cfg.data, base_items)
    new_events = time_slice(new_events, cfg.data)
    if new_events.empty:
        raise readers.DataError(f"no interactions to append (data.since={cfg.data.since}, data.until={cfg.data.until})")
    events = pd.concat([base_events, new_events[base_events.columns.intersection(new_events.columns)]], ignore_index=True)
    events = events.drop_duplicates(["user_id", "item_id", "timestamp"], ignore_index=True)
    since = float(new_events["timestamp"].min())
    appended = {"fingerprint": key, "since": since, "until": float(new_events["timestamp"].max()),
                "interactions": int(len(events) - len(base_events)), "new_items": int(len(items) - len(base_items))}
    return _write(cfg, out, events, items, skipped, manifest["fingerprint"], started, appends=[*appends, appended],
                  known_actions=manifest.get("actions", {}).get("values", []))


def _write(cfg: Config, out: Path, interactions: pd.DataFrame, items: pd.DataFrame, skipped: dict[str, int],
           key: str, started: float, appends: list[dict] | None = None, known_actions: list[str] = ()) -> Path:
    """Split, tokenise and write shards + manifest into a temporary folder, then swap it into
    place. With `appends`, the newest append's window gets its own evaluation splits."""
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    codes, actions, action_column = action_codes(interactions, cfg.data, known_actions)
    split = leave_one_out(interactions.assign(action=codes), item_index, cfg.split)
    if not split.train:
        raise readers.DataError(f"no user has {cfg.split.min_interactions} or more interactions with warm items: nothing to train on")

    tokenizer = load_tokenizer(cfg.model.item.encoder)
    texts = item_texts(items.to_dict("records"), cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len, progress="tokenise")
    since = appends[-1]["since"] if appends else None
    new_users = [since is not None and case.time >= since for case in split.test]  # test: each user's newest event

    with atomic_folder(out) as tmp:
        shards = {}
        item_samples = ({"__key__": f"{i:09d}", "tokens.npy": tokens[i], "txt": texts[i],
                         "json": {"index": i, "item_id": str(items["item_id"].iat[i]),
                                  "train_count": int(split.train_counts[i]), "cold": bool(split.cold_items[i])}}
                        for i in range(len(items)))
        shards["items"] = write_shards(tmp / "items", "items", tqdm(item_samples, total=len(items), desc="items"), cfg.data.shard_max_count)
        train_samples = ({"__key__": f"{n:09d}", "seq.npy": seq.events.items.astype(np.int32), **_events_members(seq.events),
                          "json": {"user_id": seq.user_id, "new": new_users[n]}}
                         for n, seq in enumerate(split.train))
        shards["train"] = write_shards(tmp / "train", "train", tqdm(train_samples, total=len(split.train), desc="train"), cfg.data.shard_max_count)
        evaluation = {name: getattr(split, name) for name in ("valid", "test", "cold")}
        if since is not None:
            evaluation.update({f"{name}_window": [c for c in evaluation[name] if c.time >= since] for name in ("valid", "test")})
        for name, cases in evaluation.items():
            shards[name] = write_shards(tmp / name, name, tqdm(_eval_samples(cases), total=len(cases), desc=name), cfg.data.shard_max_count)
        (tmp / "item_ids.json").write_text(json.dumps([str(i) for i in items["item_id"]]))
        interactions.reset_index(drop=True).to_parquet(tmp / EVENTS)
        items[["item_id", *cfg.data.text_fields]].astype({"item_id": str}).to_parquet(tmp / ITEMS)
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
                **{name: len(cases) for name, cases in evaluation.items()},
                "cold_items": int(split.cold_items.sum()),
                "dropped_users": split.dropped_users,
            },
            "item_ids": "item_ids.json",
            "events": EVENTS,
            "items_table": ITEMS,
            "tokenizer": {"encoder": cfg.model.item.encoder, "sha256": tokenizer_fingerprint(tokenizer), "max_text_len": cfg.data.max_text_len},
            "text_fields": list(cfg.data.text_fields),
            "actions": {"column": action_column, "values": actions},
            "split": {"protocol": "leave-one-out by time (ties keep file order)", **asdict(cfg.split)},
            "skipped": skipped,
            "shards": {name: [f"{name}/{s}" for s in files] for name, files in shards.items()},
            "shard_counts": {f"{name}/{s}": n for name, files in shards.items() for s, n in files.items()},
        }
        if appends:
            manifest["appends"] = appends
            manifest["window"] = {"since": since, "round": len(appends), "new_users": int(sum(new_users))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info(f"wrote {out} in {time.time() - started:.1f}s: {manifest['counts']}")
    return out

