"""`twotower prepare` on Ray (`data.engine=ray`): the same shards as the pandas path, built by a
map-reduce over many processes or machines (docs/data.md, "Data at scale").

Map: one Ray task per input file (an interactions file of a partitioned folder or glob, or a
prepared round's event table when appending) reads it with the pandas path's own readers (so bad
input gets the same errors, naming file and line), maps item ids to indices, and hashes its rows
by user into `data.engine_partitions` buckets. The driver then learns what needs every row: the
action vocabulary, the interacted items (for the held-out draw and its cut into cold_valid and
cold), the window's start. Reduce: one
task per bucket runs `datamodules.partition.write_partition` over its users, writing its own
shards (`train/train-p00003-000000.tar`, ...) and event table; the item shards are tokenised and
written in parallel chunks. Everything goes to a temporary folder renamed into place once the
manifest is written, so a failed prepare leaves nothing half-written. The output folder must be
one that every machine of the cluster sees (a shared filesystem)."""
from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from twotower.configs.schema import Config
from twotower.datamodules import readers
from twotower.datamodules.partition import Written, write_partition
from twotower.datamodules.prepare import (
    ITEMS,
    MANIFEST,
    action_codes,
    appended_manifest,
    check_trainable,
    event_rounds,
    held_out,
    item_sample,
    items_table,
    merge_items,
    new_manifest,
    remove_unlisted,
    round_folder,
    time_slice,
)
from twotower.datamodules.shards import write_shards
from twotower.datamodules.split import choose_cold_items, choose_cold_valid
from twotower.files import atomic_folder, write_json
from twotower.modules.item_text import item_texts, load_tokenizer, tokenize

log = logging.getLogger(__name__)

ITEM_CHUNK = 50_000
"Items per tokenising task."
EVENTS_PER_PARTITION = 500_000
"What a reduce task should hold by default: its memory stays bounded as the data grows."


def start(cfg: Config):
    """Ray, started on this machine (all its cores) or joined: `data.engine_address`, else the
    RAY_ADDRESS variable, else a local instance."""
    try:
        import ray
    except ImportError:
        raise SystemExit("data.engine=ray needs Ray Data: pip install 'twotower[scale]'") from None
    if not ray.is_initialized():
        address = cfg.data.engine_address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
        ray.init(address=address, log_to_driver=False, configure_logging=False, **local)
    return ray


def _unwrapped(err: BaseException) -> BaseException:
    """The exception a Ray task raised (a DataError names file and line), not Ray's wrapper of it."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _bucket(users: pd.Series, partitions: int) -> np.ndarray:
    """Which reduce task each user goes to: stable across processes and machines (not Python's hash),
    hashed once per distinct user."""
    distinct, rows = np.unique(users.astype(str).to_numpy(), return_inverse=True)
    buckets = np.fromiter((zlib.crc32(u.encode()) % partitions for u in distinct), dtype=np.int64, count=len(distinct))
    return buckets[rows]


def default_partitions(files: list[str], cpus: int) -> int:
    """Reduce tasks: twice the CPUs, and more for large input, so that a task holds about
    `EVENTS_PER_PARTITION` events whatever the data's size (Parquet row counts from the footers;
    text files estimated from their bytes)."""
    rows = 0
    for path in files:
        if path.lower().endswith(".parquet"):
            rows += pq.ParquetFile(path).metadata.num_rows
        else:
            rows += os.path.getsize(path) // 40
    return max(2 * cpus, -(-rows // EVENTS_PER_PARTITION))


def _map(source: tuple[str, str, int, int], cfg: Config, item_index: pd.Series, partitions: int):
    """One input file -> its rows in `partitions` buckets by user, plus what the driver needs."""
    kind, path, round_, file_number = source
    if kind == "input":
        frame, skipped = readers.read_interactions(path, cfg.data.columns, cfg.data.on_bad_row)
        frame, unknown = readers.check_consistency(frame, pd.DataFrame({"item_id": item_index.index}), path, cfg.data.items,
                                                   cfg.data.on_bad_row)
        frame = time_slice(frame, cfg.data).assign(file=np.int32(file_number))
        skipped = {k: skipped.get(k, 0) + unknown.get(k, 0) for k in {*skipped, *unknown}}
    else:  # a prepared round's event table
        frame, skipped = pd.read_parquet(path), {}
    frame = frame.assign(item=item_index.loc[frame["item_id"]].to_numpy(), round=np.int32(round_))
    buckets = _bucket(frame["user_id"], partitions)
    stats = {"rows": len(frame), "skipped": skipped, "items": np.unique(frame["item"].to_numpy()),
             "min_time": float(frame["timestamp"].min()) if len(frame) else None,
             "actions": _action_values(frame, cfg)}
    return [stats, *(frame[buckets == b].reset_index(drop=True) for b in range(partitions))]


def _action_values(frame: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The rows' distinct action values, as `action_codes` reads them (a small frame)."""
    columns = [c for c in ("event", "rating") if c in frame.columns]
    return frame[columns].drop_duplicates() if columns else pd.DataFrame(index=range(0))


def _reduce(task: int, cfg: Config, folder: str, cold_items: np.ndarray, cold_valid: np.ndarray | None, vocabulary: list[str],
            round_: int, since: float | None, *buckets: pd.DataFrame) -> Written:
    """One bucket of users: their shards, written by `write_partition`, and their event table."""
    events = pd.concat(buckets, ignore_index=True)
    if round_ > 0:  # the same event appended again is not new
        earlier = events[events["round"] < round_]
        seen = pd.MultiIndex.from_frame(earlier[["user_id", "item_id", "timestamp"]])
        events = events[(events["round"] < round_) | ~pd.MultiIndex.from_frame(events[["user_id", "item_id", "timestamp"]]).isin(seen)]
    codes, _, _ = action_codes(events, cfg.data, vocabulary)
    frame = pd.DataFrame({"user": events["user_id"].astype(str).to_numpy(), "item": events["item"].to_numpy(),
                          "time": events["timestamp"].to_numpy(dtype=np.float64), "action": codes,
                          "round": events["round"].to_numpy(), "file": events["file"].to_numpy(), "line": events["line"].to_numpy()})
    written = write_partition(frame, Path(folder), f"-p{task:05d}", cold_items, cfg.split, cfg.data.shard_max_count, round_, since,
                              cold_valid)
    new = events[events["round"] == round_].drop(columns=["item", "round"])
    (Path(folder) / "events").mkdir(parents=True, exist_ok=True)
    new.reset_index(drop=True).to_parquet(Path(folder) / "events" / f"part-p{task:05d}.parquet")
    written.shards["events"] = {f"events/part-p{task:05d}.parquet": len(new)}
    return written


def _write_item_chunk(start_index: int, items: pd.DataFrame, train_counts: np.ndarray, cold: np.ndarray, cfg: Config,
                      folder: str) -> dict[str, int]:
    tokenizer = load_tokenizer(cfg.model.item.encoder)
    texts = item_texts(items.to_dict("records"), cfg.data.text_fields)
    tokens = tokenize(tokenizer, texts, cfg.data.max_text_len)
    ids = items["item_id"].astype(str).tolist()
    samples = (item_sample(start_index + i, ids[i], tokens[i], texts[i], int(train_counts[i]), bool(cold[i])) for i in range(len(items)))
    written = write_shards(Path(folder) / "items", f"items-p{start_index // ITEM_CHUNK:05d}", samples, cfg.data.shard_max_count)
    return {f"items/{name}": n for name, n in written.items()}


def prepare(cfg: Config, key: str, base: dict | None = None) -> Path:
    """`prepare` (or, with `base`, the manifest to append to, `prepare_append`) on Ray: the same
    folder as the pandas path's. `key`: the data's fingerprint."""
    if cfg.data.source != "table":
        raise readers.DataError(f"data.engine=ray reads data.source=table (files, folders, globs), not {cfg.data.source}; "
                                "use data.engine=pandas for it")
    started = time.time()
    ray = start(cfg)
    try:
        return _prepare(ray, cfg, Path(cfg.data.dir), key, base, started)
    except Exception as err:
        raise _unwrapped(err) from None


def _prepare(ray, cfg: Config, out: Path, key: str, base: dict | None, started: float) -> Path:
    items, skipped = readers.read_items(cfg.data.items, cfg.data.item_id_column, cfg.data.text_fields, cfg.data.on_bad_row)
    round_ = 0
    sources = [("input", str(f), 0, n) for n, f in enumerate(readers.input_files(cfg.data.interactions))]
    if base is not None:
        base_items = pd.read_parquet(out / base["items_table"])
        items = merge_items(base_items, items, cfg.data.text_fields)
        round_ = max(r for _, r in event_rounds(base)) + 1
        sources = [("events", str(out / t), r, 0) for t, r in event_rounds(base)] + [("input", path, round_, n) for _, path, _, n in sources]
    item_index = pd.Series(np.arange(len(items)), index=items["item_id"].astype(str).to_numpy())
    partitions = cfg.data.engine_partitions or default_partitions([path for _, path, _, _ in sources],
                                                                  int(ray.cluster_resources().get("CPU", 1)))

    index_ref = ray.put(item_index)
    mapper = ray.remote(num_returns=partitions + 1)(_map)
    mapped = [mapper.remote(source, cfg, index_ref, partitions) for source in sources]
    stats = ray.get([refs[0] for refs in mapped])
    rows = sum(s["rows"] for s in stats)
    new_stats = [s for s, source in zip(stats, sources) if source[2] == round_]
    for s in new_stats:
        skipped = {k: skipped.get(k, 0) + s["skipped"].get(k, 0) for k in {*skipped, *s["skipped"]}}
    if not any(s["rows"] for s in new_stats):
        raise readers.DataError(f"{cfg.data.interactions}: no interactions (data.since={cfg.data.since}, data.until={cfg.data.until})")
    values = pd.concat([s["actions"] for s in stats], ignore_index=True)
    known = base.get("actions", {}).get("values", []) if base else []
    _, vocabulary, action_column = action_codes(values, cfg.data, known)
    if base is None:
        cold_items = choose_cold_items(np.unique(np.concatenate([s["items"] for s in stats])), len(items), cfg.split)
        cold_valid = choose_cold_valid(cold_items, cfg.split)
    else:
        cold_items, cold_valid = held_out(base_items, len(items))
    since = min(s["min_time"] for s in new_stats if s["min_time"] is not None) if base is not None else None
    log.info(f"ray: mapped {rows:,} interactions from {len(sources)} file(s) into {partitions} partitions in {time.time() - started:.1f}s")

    with (round_folder(out, f"appends/r{round_:04d}") if base is not None else atomic_folder(out)) as tmp:
        reducer = ray.remote(_reduce)
        cold_ref, cold_valid_ref = ray.put(cold_items), ray.put(cold_valid)
        written = Written()
        for part in ray.get([reducer.remote(b, cfg, str(tmp), cold_ref, cold_valid_ref, vocabulary, round_, since,
                                            *[refs[b + 1] for refs in mapped])
                             for b in range(partitions)]):
            written = written.add(part)
        if base is None:
            check_trainable(written, cfg)
        counts = written.counts(len(items))
        chunk = ray.remote(_write_item_chunk)
        item_shards = ray.get([chunk.remote(s, items.iloc[s:s + ITEM_CHUNK], counts[s:s + ITEM_CHUNK], cold_items[s:s + ITEM_CHUNK], cfg, str(tmp))
                               for s in range(0, len(items), ITEM_CHUNK)])
        written.shards["items"] = {name: n for part in item_shards for name, n in part.items()}
        table = items_table(items, cfg.data.text_fields, counts, cold_items, cold_valid)
        table.to_parquet(tmp / ITEMS)
        write_json(tmp / "item_ids.json", table["item_id"].tolist())
        event_parts = sorted(written.shards.pop("events"))
        tokenizer = load_tokenizer(cfg.model.item.encoder)
        actions = {"column": action_column, "values": vocabulary}
        if base is None:
            manifest = new_manifest(cfg, key, written, written.interactions, len(items), cold_items, tokenizer, actions, skipped, event_parts,
                                    cold_valid)
            manifest["engine"] = {"name": "ray", "partitions": partitions}
            write_json(tmp / MANIFEST, manifest)
    if base is not None:
        prefix = f"appends/r{round_:04d}"
        manifest = appended_manifest(cfg, base, key, written, prefix, written.interactions, items, base_items, cold_items, tokenizer, actions,
                                     skipped, [f"{prefix}/{p}" for p in event_parts], since, cold_valid)
        write_json(out / MANIFEST, manifest)
        remove_unlisted(out, base, manifest)
    log.info(f"ray: wrote {out} in {time.time() - started:.1f}s: {manifest['counts']}")
    return out
