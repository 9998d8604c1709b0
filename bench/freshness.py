"""bench/online.py's freshness part (`--freshness`, `--freshness-only`): a real `twotower serve` and
`twotower learn` on one stream; events are POSTed through `POST /events` at `--rate` events/s, and for
sampled events it measures the seconds from the POST to an export whose export.json offsets
include it, and to `GET /health` naming that export."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.timeline import BENCH_CONFIG, item_records, load_timeline, write_tables


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def freshness(args, work: Path, stale: tuple[Path, str] | None) -> dict:
    """serve + learn as subprocesses on one folder stream, the stale model (fitted here when
    `stale` is None) as the learner's start; the timeline's events after T0 are POSTed at
    `args.rate`/s (their new items POSTed to /items first), and sampled events are followed until
    an export includes them and the server names that export (or a later one) in GET /health."""
    import socket

    from twotower.configs import load_config

    events, items, extra = load_timeline(argparse.Namespace(**{**vars(args), "data": "synthetic"}), work)
    cut = int(np.searchsorted(events["timestamp"].to_numpy(), events["timestamp"].iloc[int(args.cut * len(events))]))
    if stale is None:
        known = set(events["item_id"][:cut])
        ev, it = write_tables(events[:cut], items, known, work / "tables", "fresh")
        run = work / "runs" / "fresh"
        from twotower.trainers.fit import fit

        fit(load_config([], [f"model.mode={args.mode}", "data.source=table", *BENCH_CONFIG, *extra,
                             *[o for o in args.overrides if not o.startswith(("learn.", "stream."))],
                             f"data.interactions={ev}", f"data.items={it}", f"data.dir={work / 'data' / 'fresh'}",
                             f"run.dir={run}", f"trainer.max_epochs={args.epochs}"]))
        stale = (run / "config.yaml", str(run / "checkpoints" / "best.ckpt"))
    config_file, checkpoint = stale
    fields = load_config([config_file]).data.text_fields
    items_by_id = items.set_index("item_id").to_dict("index")
    late = events[cut:]
    stream, export_dir = work / "fresh-stream", work / "fresh-export"
    for earlier in (stream, export_dir, work / "fresh-learn"):  # an earlier run's, in this folder: start empty
        shutil.rmtree(earlier, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    learn_log, serve_log = open(work / "fresh-learn.log", "w"), open(work / "fresh-serve.log", "w")  # noqa: SIM115 (closed in finally)
    cli = [sys.executable, "-m", "twotower"]
    learn_overrides = [o for o in args.overrides if o.startswith("learn.")]
    learner = subprocess.Popen([*cli, "learn", "-c", str(config_file), "--checkpoint", checkpoint, "--export", str(export_dir),
                                f"stream.url={stream}", f"learn.dir={work / 'fresh-learn'}", *learn_overrides],
                               stdout=learn_log, stderr=subprocess.STDOUT, env=env)
    server = None
    try:
        from twotower.streaming import open_stream

        # One priming event so that the learner publishes a first export for the server to start on.
        first = late.iloc[0]
        with open_stream(str(stream)) as s:
            s.append_events([{"user_id": first["user_id"], "item_id": first["item_id"], "timestamp": float(first["timestamp"])}])
        deadline = time.time() + 600
        while read_export_meta(export_dir) is None:
            if learner.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the learner exported nothing; see {work / 'fresh-learn.log'}")
            time.sleep(0.5)
        known = set(json.loads((export_dir / "item_ids.json").read_text()))
        server = subprocess.Popen([*cli, "serve", "--model", str(export_dir), "--port", str(port), f"stream.url={stream}",
                                   "serving.reload_interval_s=1"], stdout=serve_log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                http("GET", base + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start; see {work / 'fresh-serve.log'}") from None
                time.sleep(0.5)
        samples, pending, new_items = [], [], 0
        rows = late.iloc[1:].to_dict("records")
        started, sent, checked = time.time(), 0, 0.0
        duration = args.freshness_s
        sample_every = max(1, int(args.rate * 2))  # one sampled event every ~2 s
        while time.time() - started < duration and sent < len(rows):
            due = int((time.time() - started) * args.rate) + 1
            while sent < due and sent < len(rows):
                r = rows[sent]
                if r["item_id"] not in known:  # a new item: POST /items first, as a shop would
                    http("POST", base + "/items", {"items": item_records(items_by_id, [r["item_id"]], fields)})
                    known.add(r["item_id"])
                    new_items += 1
                posted = time.time()
                answer = http("POST", base + "/events", {"events": [{"user_id": r["user_id"], "item_id": r["item_id"],
                                                                    "timestamp": float(r["timestamp"])}]})
                if sent % sample_every == 0:
                    pending.append({"posted": posted, "offset": answer["offsets"][-1]})
                sent += 1
            if time.time() - checked >= 0.2:
                check_exports(export_dir, base, pending, samples)
                checked = time.time()
            time.sleep(0.01)
        achieved = sent / (time.time() - started)
        wait_until = time.time() + 180
        while pending and time.time() < wait_until:
            check_exports(export_dir, base, pending, samples)
            time.sleep(0.2)
        return {"rate": achieved, "posted": sent, "duration_s": duration, "new_items": new_items, "sampled": len(samples) + len(pending),
                "lost": len(pending), "exported": [s["exported"] for s in samples], "served": [s["served"] for s in samples],
                "learn": {k: v for k, v in load_config([config_file], learn_overrides).learn.__dict__.items()
                          if k in ("step_events", "export_every_s", "export_every_steps", "commit_every_s")}}
    finally:
        for proc in (server, learner):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        learn_log.close()
        serve_log.close()


def offset_key(offset: str):
    return (len(offset), offset)


def check_exports(export_dir: Path, base: str, pending: list[dict], samples: list[dict]) -> None:
    """Move sampled events whose export and served model include them from `pending` to `samples`."""
    now = time.time()
    meta = read_export_meta(export_dir)
    if meta is not None:
        covered = (meta.get("stream") or {}).get("offsets", {}).get("events")
        export_id = meta.get("export_id") or meta.get("id")
        for p in pending:
            if "exported" not in p and covered is not None and offset_key(covered) >= offset_key(p["offset"]):
                p["exported"], p["export_id"] = now - p["posted"], export_id
    waiting = [p for p in pending if "exported" in p]
    if waiting:
        try:
            served = http("GET", base + "/health", timeout=2).get("export_id")
        except (OSError, ValueError):
            served = None
        for p in waiting:
            if served is not None and served_at_or_after(export_dir, served, p):
                p["served"] = now - p["posted"]
    for p in [p for p in pending if "served" in p]:
        pending.remove(p)
        samples.append(p)


def read_export_meta(export_dir: Path) -> dict | None:
    for path in (export_dir / "export.json", export_dir / "current" / "export.json"):
        try:
            meta = json.loads(path.read_text())
            return meta
        except (OSError, ValueError):
            continue
    return None


def served_at_or_after(export_dir: Path, served_id: str, sample: dict) -> bool:
    """Is the export the server names the one that covered the sample, or a later one?"""
    if served_id == sample.get("export_id"):
        return True
    sample.setdefault("later_ids", set())
    meta = read_export_meta(export_dir)
    current = meta and (meta.get("export_id") or meta.get("id"))
    if current and current != sample.get("export_id"):
        sample["later_ids"].add(current)
    return served_id in sample["later_ids"]
