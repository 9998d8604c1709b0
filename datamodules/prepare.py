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
from twotower.datamodules.split import EvalCase, Events, Split, TrainSequence, leave_one_out
from twotower.files import atomic_folder, write_json
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
    for loader_only in ("batch_size", "eval_batch_size", "shuffle_buffer", "num_workers", "max_len", "dir", "name", "on_error", "shards_url", "cache_dir"):
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


def train_sample(key: str, seq: TrainSequence, round_: int = 0, first_target: int = 1) -> dict:
    """A training sequence; the training cases it holds are its positions `first_target`.. as
    targets, each with every item before it as history (an append's sample carries the user's
    older items as context only: their cases are in the shards of an earlier round)."""
    meta = {"user_id": seq.user_id, "round": round_}
    if first_target > 1:
        meta["first_target"] = first_target
    return {"__key__": key, "seq.npy": seq.events.items.astype(np.int32), **_events_members(seq.events), "json": meta}


def eval_sample(key: str, case: EvalCase) -> dict:
    return {"__key__": key, "history.npy": case.history.astype(np.int32), **_events_members(case.events),
            "json": {"user_id": case.user_id, "target": case.target, "time": case.time}}


def item_sample(index: int, item_id: str, tokens: np.ndarray, text: str, train_count: int, cold: bool) -> dict:
    return {"__key__": f"{index:09d}", "tokens.npy": tokens, "txt": text,
            "json": {"index": index, "item_id": item_id, "train_count": train_count, "cold": cold}}


def _eval_samples(cases: list[EvalCase]):
    for n, case in enumerate(cases):
        yield eval_sample(f"{n:09d}", case)


def event_tables(out: Path, manifest: dict) -> list[str]:
    """The manifest's event tables (one per prepare or append round), relative to `out`."""
    events = manifest.get("events", EVENTS)
    return [events] if isinstance(events, str) else list(events)


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
    interactions = time_slice(interactions, cfg.data)
    codes, actions, action_column = action_codes(interactions, cfg.data)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    split = leave_one_out(interactions.assign(action=codes), item_index, cfg.split)
    if not split.train:
        raise readers.DataError(f"no user has {cfg.split.min_interactions} or more interactions with warm items: nothing to train on")
    tokenizer = load_tokenizer(cfg.model.item.encoder)
    texts = item_texts(items.to_dict("records"), cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len, progress="tokenise")
    with atomic_folder(out) as tmp:
        shards = _write_items(tmp, "", items, texts, tokens, split, cfg)
        train = (train_sample(f"{n:09d}", seq) for n, seq in enumerate(split.train))
        shards["train"] = _write_split(tmp, "", "train", train, len(split.train), cfg)
        evaluation = {name: getattr(split, name) for name in ("valid", "test", "cold")}
        shards.update(_write_evaluation(tmp, "", evaluation, cfg))
        interactions.reset_index(drop=True).to_parquet(tmp / EVENTS)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": key,
            "source": cfg.data.source,
            "counts": _counts(interactions["user_id"].nunique(), len(interactions), len(items), split, evaluation, len(split.train)),
            "item_ids": "item_ids.json",
            "events": [EVENTS],
            "items_table": ITEMS,
            "tokenizer": {"encoder": cfg.model.item.encoder, "sha256": tokenizer_fingerprint(tokenizer), "max_text_len": cfg.data.max_text_len},
            "text_fields": list(cfg.data.text_fields),
            "actions": {"column": action_column, "values": actions},
            "split": {"protocol": "leave-one-out by time (ties keep input order)", **asdict(cfg.split)},
            "skipped": skipped,
            **_shard_lists(shards),
        }
        write_json(tmp / MANIFEST, manifest)
    log.info(f"wrote {out} in {time.time() - started:.1f}s: {manifest['counts']}")
    return out


def _counts(users: int, interactions: int, items: int, split: Split, evaluation: dict[str, list], train_samples: int) -> dict:
    return {
        "interactions": int(interactions),
        "users": int(users),
        "items": int(items),
        "train_users": len(split.train),
        "train_samples": int(train_samples),
        "train_events": int(split.train_counts.sum()),
        **{name: len(cases) for name, cases in evaluation.items()},
        "cold_items": int(split.cold_items.sum()),
        "dropped_users": split.dropped_users,
    }


def _shard_lists(shards: dict[str, dict[str, int]]) -> dict:
    """manifest.json's `shards` (each split's files, relative to the folder) and `shard_counts`."""
    return {"shards": {name: list(files) for name, files in shards.items()},
            "shard_counts": {path: n for files in shards.values() for path, n in files.items()}}


def _write_split(root: Path, prefix: str, name: str, samples, total: int, cfg: Config) -> dict[str, int]:
    """Shards of one split under `root/prefix/name/`; {path relative to the prepared folder: samples}."""
    written = write_shards(root / prefix / name, name, tqdm(samples, total=total, desc=name, disable=total < 10_000), cfg.data.shard_max_count)
    return {str(Path(prefix) / name / shard): n for shard, n in written.items()}


def _write_evaluation(root: Path, prefix: str, evaluation: dict[str, list[EvalCase]], cfg: Config) -> dict[str, dict[str, int]]:
    return {name: _write_split(root, prefix, name, _eval_samples(cases), len(cases), cfg) for name, cases in evaluation.items()}


def _write_items(root: Path, prefix: str, items: pd.DataFrame, texts: list[str], tokens: list[np.ndarray],
                 split: Split, cfg: Config) -> dict[str, dict[str, int]]:
    """The item shards, items.parquet (with each item's training count and held-out flag: what an
    append starts from) and item_ids.json, under `root/prefix`."""
    ids = items["item_id"].astype(str).tolist()
    samples = (item_sample(i, ids[i], tokens[i], texts[i], int(split.train_counts[i]), bool(split.cold_items[i])) for i in range(len(items)))
    shards = {"items": _write_split(root, prefix, "items", samples, len(items), cfg)}
    (root / prefix).mkdir(parents=True, exist_ok=True)
    table = items[["item_id", *cfg.data.text_fields]].astype({"item_id": str})
    table.assign(train_count=split.train_counts, cold=split.cold_items).to_parquet(root / prefix / ITEMS)
    write_json(root / prefix / "item_ids.json", ids)
    return shards


def prepare_append(cfg: Config) -> Path:
    """Add the interactions (and items) of the configured source to the data already prepared in
    `cfg.data.dir`, typically a later time window (`data.since`). Existing training shards stay as
    they are: the new round (`appends/rNNNN/`) holds, for each user with new training cases, a
    sequence whose targets are exactly those cases (the user's older items come along as history
    context), so that the old and new training shards together hold the training cases of a fresh
    prepare of all the events. The evaluation splits, the item shards and tables are written anew
    for all users (with `valid_window` / `test_window` for the users active in the window: what
    `twotower update` trains and evaluates on); item indices of the existing catalogue do not
    change, and held-out (cold) items stay as drawn the first time (new items are never held out).
    The new manifest is written last; then what it no longer lists is removed. Appending the same
    data twice is a no-op."""
    out = Path(cfg.data.dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise readers.DataError(f"{out}: nothing to append to (no {MANIFEST}); run `twotower prepare` first")
    tables = [out / t for t in event_tables(out, manifest)] + [out / manifest.get("items_table", ITEMS)]
    if not all(t.is_file() for t in tables):
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
    base_events = pd.concat([pd.read_parquet(t) for t in tables[:-1]], ignore_index=True)
    base_items = pd.read_parquet(tables[-1])
    if "cold" not in base_items.columns:
        raise readers.DataError(f"{tables[-1]}: no `cold` column (prepared by an older twotower); prepare it again with --force first")
    new_events, items, skipped = load_raw(cfg.data, base_items)
    new_events = time_slice(new_events, cfg.data)
    shared = base_events.columns.intersection(new_events.columns)
    seen = pd.MultiIndex.from_frame(base_events[["user_id", "item_id", "timestamp"]])
    new_events = new_events[~pd.MultiIndex.from_frame(new_events[["user_id", "item_id", "timestamp"]]).isin(seen)][shared]
    if new_events.empty:
        raise readers.DataError(f"no new interactions to append (data.since={cfg.data.since}, data.until={cfg.data.until})")
    round_ = len(appends) + 1
    since = float(new_events["timestamp"].min())
    appended = {"fingerprint": key, "round": round_, "since": since, "until": float(new_events["timestamp"].max()),
                "interactions": int(len(new_events)), "new_items": int(len(items) - len(base_items))}
    events = pd.concat([base_events[shared], new_events], ignore_index=True)
    codes, actions, action_column = action_codes(events, cfg.data, manifest.get("actions", {}).get("values", []))
    events = events.assign(action=codes)
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    cold_items = np.r_[base_items["cold"].to_numpy(dtype=bool), np.zeros(len(items) - len(base_items), dtype=bool)]
    split = leave_one_out(events, item_index, cfg.split, cold_items)
    window_users = set(new_events["user_id"].unique())
    before = leave_one_out(events.iloc[: len(base_events)][events["user_id"].iloc[: len(base_events)].isin(window_users)],
                           item_index, cfg.split, cold_items)
    new_sequences = list(_window_sequences(before.train, [s for s in split.train if s.user_id in window_users]))

    tokenizer = load_tokenizer(cfg.model.item.encoder)
    texts = item_texts(items.to_dict("records"), cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len, progress="tokenise")
    prefix = f"appends/r{round_:04d}"
    with atomic_folder(out / prefix) as tmp:
        shards = _write_items(tmp, "", items, texts, tokens, split, cfg)
        train = (train_sample(f"{n:09d}", seq, round_, first) for n, (seq, first) in enumerate(new_sequences))
        shards["train"] = _write_split(tmp, "", "train", train, len(new_sequences), cfg)
        evaluation = {name: getattr(split, name) for name in ("valid", "test", "cold")}
        evaluation.update({f"{name}_window": [c for c in evaluation[name] if c.time >= since] for name in ("valid", "test")})
        shards.update(_write_evaluation(tmp, "", evaluation, cfg))
        new_events.reset_index(drop=True).to_parquet(tmp / EVENTS)
    shards = {name: {f"{prefix}/{path}": n for path, n in files.items()} for name, files in shards.items()}
    old_train = {path: manifest["shard_counts"][path] for path in manifest["shards"]["train"]}
    train_samples = sum(old_train.values()) + len(new_sequences)
    shards["train"] = {**old_train, **shards["train"]}
    updated = {
        **manifest,
        "counts": _counts(events["user_id"].nunique(), len(events), len(items), split, evaluation, train_samples),
        "item_ids": f"{prefix}/item_ids.json",
        "events": [*event_tables(out, manifest), f"{prefix}/{EVENTS}"],
        "items_table": f"{prefix}/{ITEMS}",
        "actions": {"column": action_column, "values": actions},
        "skipped": {k: manifest.get("skipped", {}).get(k, 0) + skipped.get(k, 0) for k in {*manifest.get("skipped", {}), *skipped}},
        **_shard_lists(shards),
        "appends": [*appends, appended],
        "window": {"since": since, "round": round_, "new_users": len(new_sequences)},
    }
    write_json(out / MANIFEST, updated)
    _remove_unlisted(out, manifest, updated)
    log.info(f"appended round {round_} to {out} in {time.time() - started:.1f}s: {len(new_sequences)} new training "
             f"sequence(s), {updated['counts']}")
    return out


def _window_sequences(before: list[TrainSequence], after: list[TrainSequence]):
    """(sequence, first target) for each user whose training sequence grew: `after` (all events)
    with its targets from where `before` (the events prepared earlier) stopped. The earlier
    sequence must be where the new one starts: a new event older than a user's prepared events
    would change training cases already written, which an append cannot do."""
    earlier = {seq.user_id: seq.events for seq in before}
    for seq in after:
        old = earlier.get(seq.user_id)
        start = 0 if old is None else len(old)
        if old is not None and not (np.array_equal(seq.events.items[:start], old.items) and np.array_equal(seq.events.times[:start], old.times)):
            changed = int(np.argmax((seq.events.items[:start] != old.items) | (seq.events.times[:start] != old.times)))
            raise readers.DataError(
                f"user {seq.user_id!r}: a new interaction at t={seq.events.times[changed]:.0f} comes before interactions "
                f"prepared earlier (up to t={old.times[-1]:.0f}); an append can only add later events (set data.since to "
                "the end of the prepared window), or prepare all the events again with --force")
        if len(seq.events) > max(1, start):
            yield seq, max(1, start)


def _remove_unlisted(out: Path, old: dict, new: dict) -> None:
    """Delete the files `old` listed and `new` does not (the superseded evaluation and item shards and
    tables); a crash before this leaves only unlisted files, which nothing reads."""
    def listed(manifest: dict) -> set[str]:
        return {*manifest["shard_counts"], *event_tables(out, manifest), manifest.get("items_table", ITEMS), manifest.get("item_ids", "item_ids.json")}
    for name in sorted(listed(old) - listed(new)):
        (out / name).unlink(missing_ok=True)
    for folder in sorted({(out / name).parent for name in listed(old) - listed(new)}, key=lambda p: -len(p.parts)):
        if folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
