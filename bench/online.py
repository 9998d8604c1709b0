"""Prequential evaluation of online learning: does the continuous learner (`twotower learn` on the
event stream) keep up with what users do now, and what does it cost, against a stale model, a
periodic batch `update` and a full retrain?

A timeline is replayed by timestamp: the events before a cut T0 (`--cut`, a share of the events)
train the stale model (prepare + fit); the rest is cut into `--windows` windows of equal event
counts, in time order. In each window every event is first predicted, then learnt from: its user's
next item is ranked given every earlier event of theirs (the window's earlier ones included: a
server sees them as they arrive), over the full catalogue known at that moment (the items seen
before T0 and every item whose first event came before or with this one), the history's items
filtered (eval.filter_seen); HR@10 and NDCG@10 are per event, and every approach is scored on the
same events, so the differences are paired per event. Events of a user with no earlier event are
skipped.

  (a) stale       the T0 model, never updated (new items get their text vector, and in id+text
                  a fresh ID row, as the learner's catalogue does);
  (b) learner     the real `Learner` (trainers/learn.py) on a real stream (a folder), chunk by
                  chunk of `learn.step_events` events: the chunk's new items are claimed on the
                  stream and taken in, the chunk is predicted by the model as it stands, then
                  appended to the stream and learnt (`Learner.learn_available`: one step);
  (c) periodic    after each window: `prepare --append` of the window, then `twotower update` from
                  the latest kept checkpoint; predicts the next window as it stood at its start;
  (d) retrain     after each window: prepare + fit from scratch on every event so far, the stale
                  model's epochs; predicts the next window as it stood at its start.

CPU seconds are process CPU time (getrusage of this process and its children) around each
approach's learning (not its scoring). New items are the items first seen after T0: their share of
the top-10 slots and of the hits, per window.

`--freshness` (bench/freshness.py) starts a real `twotower serve` and `twotower learn` on one stream, posts events
through `POST /events` at `--rate` events/s, and measures for sampled events the seconds from the
POST to an export whose export.json offsets include it, and to `GET /health` naming that export.

    python bench/online.py                                   # the built-in timeline, id+text (frozen MiniLM)
    python bench/online.py --mode text --approaches stale,learner   # the text mode's new-item shares
    python bench/online.py --data ml100k                     # ../shared/data/ml-100k (no retrain unless --retrain)
    python bench/online.py --freshness-only                  # the serve + learn freshness part alone
    python bench/online.py --quick                           # a smoke run (seconds to a minute)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.tables import markdown_table

from bench.freshness import freshness
from bench.paired import standard_error
from bench.timeline import BENCH_CONFIG, item_records, load_timeline, write_tables

APPROACHES = ("stale", "learner", "periodic", "retrain")
K = 10


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Meter:
    """CPU and wall seconds spent inside `with meter:` blocks, summed; with `threads`, torch runs
    that many threads inside them (the learner's: `trainers.learn.learn_threads`)."""

    def __init__(self, threads: int = 0):
        self.cpu = self.wall = 0.0
        self.threads = threads

    def __enter__(self):
        import torch

        self._threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        self._cpu, self._wall = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu += cpu_seconds() - self._cpu
        self.wall += time.perf_counter() - self._wall
        import torch

        torch.set_num_threads(self._threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="synthetic | ml100k | amazon-office | a folder of interactions.csv + items.csv")
    parser.add_argument("--mode", default="id+text", choices=["id", "text", "id+text"])
    parser.add_argument("--cut", type=float, default=0.5, help="share of the events before T0 (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="max epochs of the stale fit and of each retrain")
    parser.add_argument("--update-epochs", type=int, default=2)
    parser.add_argument("--approaches", default=",".join(APPROACHES), help="comma-separated subset of " + ",".join(APPROACHES))
    parser.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=None,
                        help="run the full retrain (default: on the built-in data only)")
    parser.add_argument("--max-windows", type=int, help="stop after this many windows (for choosing settings on the first ones)")
    parser.add_argument("--reuse", action="store_true", help="reuse the stale fit already in --out (for choosing settings)")
    parser.add_argument("--freshness", action="store_true", help="also run the serve + learn freshness part")
    parser.add_argument("--freshness-only", action="store_true")
    parser.add_argument("--freshness-s", type=float, default=90.0)
    parser.add_argument("--rate", type=float, default=20.0, help="events/s posted in the freshness part")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 users, 2 windows, 1 epoch, a tiny random BERT")
    parser.add_argument("--out", type=Path, help="results folder (default: a temporary one); online.json, online.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every model (learn.* for the learner)")
    return parser.parse_args(argv)


# ---- the timeline ------------------------------------------------------------------------------
def boundaries(times: np.ndarray, cut: float, windows: int) -> list[int]:
    """Positions (in time order) where T0 and each window start, snapped so a timestamp never
    straddles two windows; the last is len(times)."""
    n, edges = len(times), []
    for share in [cut + (1 - cut) * w / windows for w in range(windows)]:
        edges.append(int(np.searchsorted(times, times[min(int(share * n), n - 1)], side="left")))
    return [*edges, n]


# ---- scoring -----------------------------------------------------------------------------------
class Timeline:
    """The events as arrays, each user's positions, and each item's first position."""

    def __init__(self, events, t0: int):
        self.users = events["user_id"].to_numpy()
        self.items = events["item_id"].to_numpy()
        self.times = events["timestamp"].to_numpy(np.float64)
        self.by_user: dict[str, list[int]] = {}
        self.rank_in_user = np.zeros(len(events), dtype=np.int64)
        for p, u in enumerate(self.users):
            mine = self.by_user.setdefault(u, [])
            self.rank_in_user[p] = len(mine)
            mine.append(p)
        first = events.reset_index().groupby("item_id")["index"].min()
        self.first = {item: (-1 if pos < t0 else int(pos)) for item, pos in first.items()}
        "Item -> position of its first event (-1: seen before T0)."
        self.new = {item for item, pos in self.first.items() if pos >= 0}

    def new_items_between(self, start: int, stop: int) -> list[str]:
        return sorted((item for item in self.new if start <= self.first[item] < stop), key=self.first.get)


def item_table(learner):
    import torch

    model = learner.module.model
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.catalogue_vectors(learner.model_cfg.eval.item_batch_size)
    finally:
        model.train(training)


def score(learner, timeline: Timeline, positions: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """Per event at `positions`: the rank of its item given the user's earlier events, over the
    items known at that moment, by `learner`'s current model; hr, ndcg, and how many of the top 10
    are new items."""
    import torch

    from twotower.modules.histories import pad_histories, time_gap_codes

    model, max_len = learner.module.model, learner.cfg.data.max_len
    filter_seen = learner.model_cfg.eval.filter_seen
    table = item_table(learner)
    ids = learner.item_ids
    known_from = torch.tensor([timeline.first.get(i, -1) for i in ids], dtype=torch.long)
    is_new = torch.tensor([i in timeline.new for i in ids])
    index = learner.item_index
    out = {"rank": [], "new_top": []}
    training = model.training
    model.eval()
    try:
        for start in range(0, len(positions), batch):
            chunk = positions[start:start + batch]
            hist_items, gaps, codes = [], [], []
            for p in chunk:
                earlier = timeline.by_user[timeline.users[p]][:timeline.rank_in_user[p]]
                times = timeline.times[earlier]
                g = time_gap_codes(np.maximum.accumulate(times))[-max_len:]
                hist_items.append(np.array([index[i] for i in timeline.items[earlier[-max_len:]]], dtype=np.int64))
                gaps.append(g)
                codes.append(np.zeros(len(g), dtype=np.int64))
            history = pad_histories(hist_items, gaps, codes)
            targets = torch.tensor([index[timeline.items[p]] for p in chunk])
            with torch.no_grad():
                users = model.user_vectors(history, table).float()
                scores = users @ table.float().T
                rows = torch.arange(len(chunk))
                scores[known_from[None, :] > torch.as_tensor(chunk)[:, None]] = float("-inf")  # not yet in the catalogue
                if filter_seen:
                    seen = history.items
                    r = rows[:, None].expand_as(seen)
                    scores[r[seen >= 0], seen[seen >= 0]] = float("-inf")
                target_scores = scores[rows, targets].clone()
                top = scores.topk(K, dim=1).indices  # the target competes as any item does
                scores[rows, targets] = float("-inf")
                out["rank"].append((scores >= target_scores[:, None]).sum(1))
                out["new_top"].append(is_new[top].sum(1))
    finally:
        model.train(training)
    ranks = torch.cat(out["rank"]).numpy() if out["rank"] else np.zeros(0, dtype=np.int64)
    hit = ranks < K
    return {"hr": hit.astype(float), "ndcg": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0),
            "new_top": (torch.cat(out["new_top"]).numpy() if out["new_top"] else np.zeros(0)).astype(float)}


# ---- the approaches ----------------------------------------------------------------------------
def make_learner(config_file: Path, checkpoint: str, stream: Path, learn_dir: Path, overrides: list[str]):
    from twotower.configs import load_config
    from twotower.trainers.learn import Learner

    cfg = load_config([config_file], [*overrides, f"stream.url={stream}", f"learn.dir={learn_dir}"])
    return Learner(cfg, checkpoint)


def add_items(learner, stream_dir: Path, records: list[dict]) -> None:
    """Claim items on a scorer's own stream and let it take them (a catalogue grown as the learner's is)."""
    from twotower.streaming import open_stream

    if records:
        with open_stream(str(stream_dir)) as stream:
            stream.claim_items(records)
        learner.learn_available()


def run_windows(args, work: Path) -> dict | None:
    import torch

    from twotower.configs import load_config
    from twotower.datamodules.prepare import prepare, prepare_append
    from twotower.trainers.fit import fit
    from twotower.trainers.learn import learn_threads
    from twotower.trainers.update import update

    loaded = load_timeline(args, work)
    if loaded is None:
        return None
    events, items, data_overrides = loaded
    approaches = [a for a in args.approaches.split(",") if a]
    if args.retrain is False or (args.retrain is None and args.data != "synthetic"):
        approaches = [a for a in approaches if a != "retrain"]
    edges = boundaries(events["timestamp"].to_numpy(), args.cut, args.windows)
    t0 = edges[0]
    timeline = Timeline(events, t0)
    # Every fit, retrain, update and learner of the run shares one frozen-encoder cache on disk, as a
    # deployment that sets model.item.frozen_cache_dir does: a catalogue already encoded is read back.
    model_overrides = [f"model.mode={args.mode}", "data.source=table", *BENCH_CONFIG, f"model.item.frozen_cache_dir={work / 'frozen-cache'}",
                       *data_overrides, *args.overrides]
    learn_overrides = [o for o in model_overrides if o.startswith(("learn.", "stream."))]
    fit_overrides = [o for o in model_overrides if not o.startswith(("learn.", "stream."))]
    base_cfg = load_config([], [o for o in model_overrides if o != "data.source=table"])
    fields = base_cfg.data.text_fields
    items_by_id = items.set_index("item_id").to_dict("index")
    for i in items_by_id:
        items_by_id[i]["item_id"] = i
    print(f"bench/online.py: data {args.data} ({len(events)} events, {events['user_id'].nunique()} users, {len(items)} items), "
          f"mode {args.mode}, T0 at event {t0} ({args.cut:.0%}), {args.windows} windows of ~{(len(events) - t0) // args.windows} events, "
          f"approaches {', '.join(approaches)}; stale/retrain max epochs {args.epochs}, update epochs {args.update_epochs}; "
          f"config {' '.join(fit_overrides)} {' '.join(learn_overrides)}; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}", flush=True)

    def fit_on(stop: int, name: str) -> tuple[Path, str]:
        known = set(events["item_id"][:stop])
        ev, it = write_tables(events[:stop], items, known, work / "tables", name)
        run = work / "runs" / name
        if args.reuse and name == "stale" and (run / "checkpoints" / "best.ckpt").is_file():
            print(f"reusing the stale fit in {run}")
            return run / "config.yaml", str(run / "checkpoints" / "best.ckpt")
        fit(load_config([], fit_overrides + [f"data.interactions={ev}", f"data.items={it}", f"data.dir={work / 'data' / name}",
                                             f"run.dir={run}", f"trainer.max_epochs={args.epochs}"]))
        return run / "config.yaml", str(run / "checkpoints" / "best.ckpt")

    meters = {a: Meter(learn_threads(base_cfg) if a == "learner" else 0) for a in APPROACHES}
    with meters["stale"]:
        stale_config, stale_ckpt = fit_on(t0, "stale")
    cost_file = work / "runs" / "stale" / "bench_cost.json"
    if args.reuse and cost_file.is_file():
        meters["stale"].cpu, meters["stale"].wall = json.loads(cost_file.read_text())
    else:
        cost_file.write_text(json.dumps([meters["stale"].cpu, meters["stale"].wall]))
    print(f"stale model: {meters['stale'].wall:.0f} s wall, {meters['stale'].cpu:.0f} s CPU", flush=True)
    scorers: dict[str, object] = {}
    streams = work / "streams"
    # A learner resumes from its learn.dir: one left by an earlier run in this folder (--reuse) would
    # start having learnt the whole timeline already. Every stream and learner starts empty.
    for earlier in (streams, work / "learn"):
        shutil.rmtree(earlier, ignore_errors=True)
    if "stale" in approaches:
        scorers["stale"] = make_learner(stale_config, stale_ckpt, streams / "stale", work / "learn" / "stale", learn_overrides)
    learner = None
    if "learner" in approaches:
        with meters["learner"]:
            learner = make_learner(stale_config, stale_ckpt, streams / "learner", work / "learn" / "learner", learn_overrides)
    from twotower.streaming import open_stream

    step_events = learner.cfg.learn.step_events if learner else 0
    periodic_ckpt = stale_ckpt
    windows, learnt_wall = [], {a: 0.0 for a in APPROACHES}
    per_event: dict[str, list[np.ndarray]] = {a: [] for a in approaches}
    periodic_dir = [f"data.dir={work / 'data' / 'periodic'}"]  # the stale data, then each window appended
    last = min(args.windows, args.max_windows or args.windows)
    for w in range(last):
        start, stop = edges[w], edges[w + 1]
        positions = np.arange(start, stop)
        positions = positions[timeline.rank_in_user[positions] > 0]  # a user with no earlier event: skipped
        new_here = timeline.new_items_between(start, stop)
        row = {"window": w + 1, "events": stop - start, "scored": len(positions), "new items": len(new_here),
               "targets_new": np.array([timeline.items[p] in timeline.new for p in positions], dtype=bool)}
        results = {}
        for name in [a for a in approaches if a != "learner"]:  # the models as they stood at the window's start
            if name != "stale" and w == 0:
                scorer = scorers["stale"] if "stale" in scorers else make_learner(
                    stale_config, stale_ckpt, streams / f"{name}-0", work / "learn" / f"{name}-0", learn_overrides)
            else:
                scorer = scorers[name]
            add_items(scorer, streams / (name if name == "stale" else f"{name}-{w}"), item_records(
                items_by_id, [i for i in new_here if i not in scorer.item_index], fields))
            results[name] = score(scorer, timeline, positions)
        if learner is not None:  # predict each chunk, then learn it
            parts = []
            with open_stream(str(streams / "learner")) as stream:
                for chunk_start in range(start, stop, step_events):
                    chunk_stop = min(chunk_start + step_events, stop)
                    with meters["learner"]:
                        stream.claim_items(item_records(items_by_id, timeline.new_items_between(chunk_start, chunk_stop), fields))
                        learner.learn_available()  # the chunk's new items, before its events
                    mine = positions[(positions >= chunk_start) & (positions < chunk_stop)]
                    parts.append(score(learner, timeline, mine))
                    with meters["learner"]:
                        began = time.perf_counter()
                        stream.append_events([{"user_id": timeline.users[p], "item_id": timeline.items[p],
                                               "timestamp": float(timeline.times[p])} for p in range(chunk_start, chunk_stop)])
                        learner.learn_available()
                        learnt_wall["learner"] += time.perf_counter() - began
                with meters["learner"]:
                    learner.commit()
            results["learner"] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for name, r in results.items():
            per_event[name].append(r)
            row[name] = r
        windows.append(row)
        print(f"window {w + 1}: " + ", ".join(f"{n} NDCG@10 {r['ndcg'].mean():.4f}" for n, r in results.items()), flush=True)
        if w + 1 == last:
            break
        # The batch approaches learn the window that just ended, for the next one.
        window_events = events[start:stop]
        known_now = set(events["item_id"][:stop])
        if "periodic" in approaches:
            ev, it = write_tables(window_events, items, known_now, work / "tables", f"window{w + 1}")
            if w == 0:  # a copy of the stale model's prepared data (there already in a live system: not counted)
                prepare(load_config([stale_config], periodic_dir))
            with meters["periodic"]:
                began = time.perf_counter()
                prepare_append(load_config([stale_config], [*periodic_dir, f"data.interactions={ev}", f"data.items={it}"]))
                summary = update(load_config([stale_config], [*periodic_dir, f"update.epochs={args.update_epochs}"]), periodic_ckpt,
                                 work / "runs" / f"update{w + 1}")
                learnt_wall["periodic"] += time.perf_counter() - began
            if summary["kept"] == "updated":
                periodic_ckpt = summary["best_checkpoint"]
            row["update kept"] = summary["kept"]
            scorers["periodic"] = make_learner(stale_config, periodic_ckpt, streams / f"periodic-{w + 1}",
                                               work / "learn" / f"periodic-{w + 1}", [*learn_overrides, *periodic_dir])
        if "retrain" in approaches:
            with meters["retrain"]:
                began = time.perf_counter()
                config, ckpt = fit_on(stop, f"retrain{w + 1}")
                learnt_wall["retrain"] += time.perf_counter() - began
            scorers["retrain"] = make_learner(config, ckpt, streams / f"retrain-{w + 1}", work / "learn" / f"retrain-{w + 1}",
                                              learn_overrides)
        print(f"  after window {w + 1}: " + ", ".join(f"{a} CPU {meters[a].cpu:.0f} s" for a in approaches), flush=True)
    learnt_events = {"learner": edges[last] - t0, "periodic": edges[last - 1] - t0, "retrain": edges[last - 1] - t0}
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "config": fit_overrides + learn_overrides, "approaches": approaches, "edges": edges,
            "learner_settings": None if learner is None else {k: getattr(learner.cfg.learn, k) for k in ("step_events", "replay_fraction", "history_len", "replay_len", "lr", "dropout", "num_threads")}
            | {"trainer.lr": learner.cfg.trainer.lr},
            "windows": windows, "per_event": per_event,
            "cpu": {a: meters[a].cpu for a in APPROACHES}, "wall": {a: meters[a].wall for a in APPROACHES},
            "learnt_wall": learnt_wall, "learnt_events": learnt_events, "stale": (stale_config, stale_ckpt)}


# ---- the report --------------------------------------------------------------------------------
def paired(values: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    diff = values - base
    return float(diff.mean()), standard_error(diff)


def report(result: dict, out: Path) -> dict:
    approaches, windows = result["approaches"], result["windows"]
    per_event = {a: {k: np.concatenate([w[k] for w in result["per_event"][a]]) for k in ("hr", "ndcg", "new_top")}
                 for a in approaches}
    base = "stale" if "stale" in approaches else None
    rows = []
    for w in [*windows, None]:
        label = "all" if w is None else str(w["window"])
        for a in approaches:
            r = per_event[a] if w is None else w[a]
            item = {"window": label, "approach": a, "events": len(r["ndcg"]), "HR@10": r["hr"].mean(), "NDCG@10": r["ndcg"].mean()}
            if base and a != base:
                b = per_event[base] if w is None else w[base]
                item["NDCG@10 - stale"], item["paired SE"] = paired(r["ndcg"], b["ndcg"])
                item["HR@10 - stale"], item["HR paired SE"] = paired(r["hr"], b["hr"])
            hits = r["hr"] > 0
            item["new in top-10"] = r["new_top"].mean() / K if len(r["ndcg"]) else 0.0
            targets_new = w["targets_new"] if w is not None else np.concatenate([x["targets_new"] for x in windows])
            item["new of hits"] = float(targets_new[hits].mean()) if hits.any() else 0.0
            rows.append(item)
    cost = []
    for a in approaches:
        if a == "stale":
            cost.append({"approach": a, "CPU s": result["cpu"][a], "CPU ms / event": float("nan"), "events/s learnt": float("nan"),
                         "note": "the T0 fit (every approach starts from it)"})
            continue
        learnt = result["learnt_events"][a]
        cost.append({"approach": a, "CPU s": result["cpu"][a], "CPU ms / event": 1000 * result["cpu"][a] / max(learnt, 1),
                     "events/s learnt": learnt / result["learnt_wall"][a] if result["learnt_wall"][a] else float("nan"),
                     "note": f"{learnt} events learnt"})
    return {"rows": rows, "cost": cost, "per_event": per_event}


def fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def goals(result: dict, table: dict, freshness: dict | None) -> list[tuple[str, bool | None, str]]:
    out = []
    approaches = result["approaches"]
    rows = table["rows"]
    get = {(r["window"], r["approach"]): r for r in rows}
    if {"stale", "learner"} <= set(approaches):
        overall = get[("all", "learner")]
        d, se = overall["NDCG@10 - stale"], overall["paired SE"]
        out.append(("learner beats stale by > 2 paired SEs overall", d > 2 * se, f"NDCG@10 {d:+.4f}, paired SE {se:.4f} ({d / se:+.1f} SE)"))
        worst = min((get[(str(w["window"]), "learner")] for w in result["windows"]), key=lambda r: r["NDCG@10 - stale"] / max(r["paired SE"], 1e-12))
        z = worst["NDCG@10 - stale"] / max(worst["paired SE"], 1e-12)
        out.append(("learner not below stale by > 1 SE in any window", z >= -1,
                    f"worst window {worst['window']}: {worst['NDCG@10 - stale']:+.4f} ({z:+.1f} SE)"))
    if {"stale", "learner", "retrain"} <= set(approaches):
        gain_l, gain_r = get[("all", "learner")]["NDCG@10 - stale"], get[("all", "retrain")]["NDCG@10 - stale"]
        share = gain_l / gain_r if gain_r > 0 else float("nan")
        cpu = result["cpu"]["learner"] / result["cpu"]["retrain"]
        out.append((">= 80 % of the full retrain's gain at <= 25 % of its CPU", bool(share >= 0.8 and cpu <= 0.25),
                    (f"gain {gain_l:+.4f} vs retrain {gain_r:+.4f} ({share:.0%}); CPU {result['cpu']['learner']:.0f} s vs "
                     f"{result['cpu']['retrain']:.0f} s ({cpu:.0%})")))
    if freshness and freshness.get("served"):
        served = freshness["served"]
        out.append(("at 20 events/s an event reaches the served model within 60 s", max(served) <= 60.0,
                    (f"POST -> served: median {np.median(served):.1f} s, max {max(served):.1f} s ({len(served)} sampled events, "
                     f"{freshness['rate']:.1f} events/s achieved)")))
    return out


def plot(result: dict, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    windows = [w["window"] for w in result["windows"]]
    for a in result["approaches"]:
        ys = [w[a]["ndcg"].mean() for w in result["windows"]]
        ses = [standard_error(w[a]["ndcg"]) for w in result["windows"]]
        ax.errorbar(windows, ys, yerr=ses, marker="o", capsize=3, label=a)
    ax.set_xlabel("window (time order, after T0)")
    ax.set_ylabel("prequential NDCG@10")
    ax.set_xticks(windows)
    ax.set_title(f"bench/online.py: {result['args']['data']}, {result['args']['mode']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


# ---- freshness ---------------------------------------------------------------------------------
# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import save_tiny_bert

        tiny = save_tiny_bert(Path(tempfile.gettempdir()) / "twotower-online-tiny-bert")
        args.epochs, args.update_epochs, args.windows, args.freshness_s = 1, 1, 2, 10.0
        args.overrides = ["data.synthetic.num_users=200", "data.synthetic.num_items=80", "data.max_len=20",
                          f"model.item.encoder={tiny}", "learn.step_events=128", "data.max_text_len=16", *args.overrides]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-online-"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    result, table, fresh = None, None, None
    if not args.freshness_only:
        result = run_windows(args, work)
        if result is None:
            return 0
        table = report(result, out)
    if args.freshness or args.freshness_only:
        fresh = freshness(args, work, result["stale"] if result else None)
    print_report(args, result, table, fresh, out)
    return 0


def print_report(args, result, table, fresh, out: Path) -> None:
    saved = {}
    if result is not None:
        print(f"\nPrequential: each event ranked over the items known at that moment (eval.filter_seen), then learnt. "
              f"stale, periodic and retrain predict a whole window with the model as it stood at the window's start; the "
              f"learner predicts each chunk of learn.step_events={result['learner_settings']['step_events'] if result['learner_settings'] else '-'} "
              f"events with the model as it stands, then learns the chunk (one step). Paired SE: of the per-event difference "
              f"to stale. New items: first seen after T0; 'new in top-10' is their share of the top-10 slots, 'new of hits' "
              f"their share of the hits.\n")
        columns = ["window", "approach", "events", "HR@10", "NDCG@10", "NDCG@10 - stale", "paired SE", "new in top-10", "new of hits"]
        print(markdown_table([{c: fmt(r.get(c, "")) if r.get(c, "") != "" else "" for c in columns} for r in table["rows"]], columns))
        print()
        print(markdown_table([{c: fmt(v) for c, v in r.items()} for r in table["cost"]], ["approach", "CPU s", "CPU ms / event", "events/s learnt", "note"]))
        kept = [w.get("update kept") for w in result["windows"] if w.get("update kept")]
        if kept:
            print(f"\nupdate kept per window: {', '.join(kept)}")
        print(f"learner settings: {result['learner_settings']}")
        png = out / "online.png"
        plot(result, table, png)
        print(f"plot: {png}")
        saved = {"args": result["args"], "config": result["config"], "edges": result["edges"],
                 "learner_settings": result["learner_settings"], "cpu": result["cpu"], "wall": result["wall"],
                 "rows": table["rows"], "cost": table["cost"],
                 "windows": [{k: v for k, v in w.items() if k not in result["approaches"] and k != "targets_new"} for w in result["windows"]]}
    if fresh is not None:
        print(f"\nFreshness: serve + learn on one folder stream, POST /events at {fresh['rate']:.1f} events/s for "
              f"{fresh['duration_s']:.0f} s ({fresh['posted']} events); {fresh['sampled']} sampled events, "
              f"{fresh['lost']} not served by the end; {fresh['new_items']} new items POSTed to /items first; learner {fresh['learn']}")
        rows = []
        for name in ("exported", "served"):
            v = fresh[name]
            rows.append({"seconds from POST to": "an export that includes it" if name == "exported" else "GET /health naming that export (or a later one)",
                         "median": fmt(float(np.median(v))) if v else "-", "max": fmt(float(max(v))) if v else "-", "n": len(v)})
        print(markdown_table(rows, ["seconds from POST to", "median", "max", "n"]))
        saved["freshness"] = fresh
    met = goals(result, table, fresh) if result is not None else goals({"approaches": []}, {"rows": []}, fresh)
    print("\nGoals (issue 22):")
    for name, ok, detail in met:
        print(f"- {name}: {'met' if ok else 'NOT met'} ({detail})")
    saved["goals"] = [{"goal": n, "met": ok, "detail": d} for n, ok, d in met]
    path = out / "online.json"
    tmp = path.with_name(".online.json.tmp")
    tmp.write_text(json.dumps(saved, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    os.replace(tmp, path)
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
