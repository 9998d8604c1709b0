"""New items through the live path: a trained run's held-out items (`split.cold_item_fraction`) are
POSTed to a running `twotower serve` whose export never had them, and then every user who later
interacted with one (the run's `cold_valid` and `cold` cases) asks `POST /recommend` with their
history, as a shop would once the item is on sale.

For each run it prints, over HTTP and offline side by side on the same cases:
  * HR@10 and NDCG@10 of the held-out target for the cold_valid and cold users ("served"), and the
    same run's full-ranking numbers (`evaluate`'s, where the held-out items are in the catalogue
    from the start, with the vectors training gave them) on those cases ("offline");
  * the same for the warm users' validation targets (`valid`), asked once before the held-out items
    are POSTed and once after, with the per-user difference and its paired standard error, and the
    held-out items' share of those users' top-10 slots: what recommending new items costs the
    users who did not want them (in this protocol a warm user's target is never a held-out item).
Then, offline, the trade a prior would make: every held-out item's score shifted by `--shifts`
values b (a new-item score bias; b = 0 is what the server ranks by, -inf leaves them out), with warm
validation and cold_valid NDCG@10 and the warm users' paired change against b = -inf, averaged over
the runs of one mode and cold_weight (seeds).

The served and offline numbers differ only where `POST /items` embeds an item differently from
the export (its text through the live tokenizer and encoder instead of the training-time cache) or
the index is approximate (HNSW, from `serving.hnsw_min_items` items on): the bench prints both.

    python bench/live_items.py RUN [RUN ...] [--out DIR]   # run folders of `twotower fit ... split.cold_item_fraction=0.1`
    python bench/live_items.py --quick                     # fits a tiny text model on the built-in generator first (about a minute)

A run's data must still be where it was prepared (its config's data.dir), and its item table
(data.items) readable: the held-out items are POSTed with their own text fields from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.tables import markdown_table

from bench.freshness import http
from bench.paired import standard_error
from bench.serve import start_server
from bench.timeline import item_records

K = 10
SPLITS = ("valid", "cold_valid", "cold")
QUICK = ["data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.synthetic.mean_events=15",
         "data.max_text_len=16", "data.max_len=20", "data.batch_size=64", "data.shuffle_buffer=50", "model.dim=32",
         "model.loss.num_negatives=32", "trainer.warmup_steps=2", "trainer.max_epochs=2", "trainer.patience=1",
         "model.mode=text", "model.item.train_layers=0", "split.cold_item_fraction=0.2",
         "logger.wandb.mode=disabled"]
"""--quick: tests/conftest.py's `tiny` sizes, a fifth of the items held out; text mode, where new
items compete from the first epoch (a new-item head this small and short-trained ranks none of them)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (config.yaml, checkpoints/best.ckpt)")
    parser.add_argument("--quick", action="store_true", help="fit a tiny text-mode run on the built-in generator and measure it")
    parser.add_argument("--batch", type=int, default=128, help="histories per POST /recommend (default: %(default)s)")
    parser.add_argument("--shifts", default="0,-0.25,-0.5,-1,-inf", help="held-out items' score shifts of the offline trade-off (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="results folder (default: a temporary one): live_items.json, per-run work folders")
    args = parser.parse_args(argv)
    if bool(args.runs) == args.quick:
        parser.error("give run folders, or --quick")
    return args


def quick_run(work: Path) -> Path:
    """A tiny text-mode fit with held-out items, on the built-in generator's tables written as CSV
    (so that the held-out items' text fields can be POSTed as a shop would send them)."""
    sys.path.insert(0, str(REPO / "tests"))
    from twotower.configs import load_config
    from twotower.datamodules.synthetic import generate
    from twotower.trainers.fit import fit

    from helpers import save_tiny_bert

    tiny = save_tiny_bert(work / "tiny-bert")
    overrides = [*QUICK, f"model.item.encoder={tiny}"]
    events, items = generate(load_config([], overrides).data.synthetic)
    work.mkdir(parents=True, exist_ok=True)
    events.to_csv(work / "interactions.csv", index=False)
    items.to_csv(work / "items.csv", index=False)
    run = work / "runs" / "quick"
    fit(load_config([], [*overrides, "data.source=table", f"data.interactions={work / 'interactions.csv'}",
                         f"data.items={work / 'items.csv'}", f"data.dir={work / 'data'}", f"run.dir={run}"]))
    return run


def offline_ranks(module, data, table) -> dict[str, np.ndarray]:
    """0-based rank of each case's target per split, as `evaluate` ranks them (full catalogue `table`)."""
    import torch

    with torch.no_grad():
        return {split: torch.cat([module.target_ranks(h, t, table) for h, t in data.eval_dataloader(split)]).numpy()
                for split in SPLITS}


def shifted_ndcg(module, data, table, cold: np.ndarray, shifts: list[float]) -> dict[tuple[str, float], np.ndarray]:
    """Per-user NDCG@10 of `valid` and `cold_valid` with every held-out item's score shifted by b, for
    b in `shifts`: a constant coordinate appended to the user vectors, b to the held-out items'."""
    import torch

    from twotower.modules.metrics import target_ranks

    ev, max_len = module.cfg.eval, module.cfg.data.max_len
    out = {}
    table = table.float()
    with torch.no_grad():
        for split in ("valid", "cold_valid"):
            batches = [(torch.cat([module.model.user_vectors(h.newest(max_len), table), torch.ones(len(t), 1)], 1), t,
                        h.items if ev.filter_seen else None) for h, t in data.eval_dataloader(split)]
            for b in shifts:
                items = torch.cat([table, torch.where(torch.from_numpy(cold), b, 0.0)[:, None]], 1)
                ranks = torch.cat([target_ranks(u, items, t, x, ev.score_chunk_size) for u, t, x in batches]).numpy()
                out[split, b] = ndcg_of(np.minimum(ranks, K))
    return out


def trade_off(runs: list[tuple[dict, dict]], shifts: list[float]) -> list[dict]:
    """Rows of the offline trade-off, averaged over the runs of each (mode, cold_weight): the mean
    over runs of each run's NDCG@10, and of each run's paired warm change against b = -inf, whose
    standard error is that of a mean of independent runs (sqrt(sum se^2) / runs)."""
    groups: dict[tuple, list[dict]] = {}
    for row, ndcg in runs:
        groups.setdefault((row["mode"], row["cold_weight"]), []).append(ndcg)
    rows = []
    for (mode, weight), members in groups.items():
        for b in shifts:
            change = [n["valid", b] - n["valid", float("-inf")] for n in members]
            rows.append({"mode": mode, "cold_weight": weight, "shift": b, "runs": len(members),
                         "valid": np.mean([n["valid", b].mean() for n in members]),
                         "cold_valid": np.mean([n["cold_valid", b].mean() for n in members]),
                         "change": np.mean([c.mean() for c in change]),
                         "change_se": math.sqrt(sum(standard_error(c) ** 2 for c in change)) / len(members)})
    return rows


def cases(data, split: str) -> tuple[list[list[int]], np.ndarray]:
    """(histories as item indices, oldest first; targets) of a split's users, in `offline_ranks`' order."""
    histories, targets = [], []
    for h, t in data.eval_dataloader(split):
        for row in h.items.tolist():
            histories.append([i for i in row if i >= 0])
        targets.append(t.numpy())
    return histories, np.concatenate(targets)


def warm_export(cfg, checkpoint: Path, cold: np.ndarray, work: Path) -> Path:
    """`twotower export` of the run, then the same folder without the held-out items: the model a
    server runs before any of them exists."""
    import torch

    from twotower.serving.export_format import load_exported, write_exported
    from twotower.serving.item_index import build_index
    from twotower.trainers.export import export

    full = load_exported(export(cfg, str(checkpoint), work / "export-all", cfg.serving))
    keep = np.flatnonzero(~cold)
    tower = full.model.item_tower  # its per-item state (ID rows, tokens) cut to the items kept
    if tower.id_embedding is not None:
        tower.id_embedding = torch.nn.Embedding.from_pretrained(tower.id_embedding.weight[keep].clone())
    tower.set_catalogue(tower.tokens[keep], tower.lengths[keep])
    vectors = full.vectors[keep].contiguous()
    warm = replace(full, item_ids=[full.item_ids[i] for i in keep], texts=[full.texts[i] for i in keep],
                   vectors=vectors, index=build_index(vectors.numpy(), cfg.serving))
    return write_exported(work / "export-warm", warm, str(checkpoint))


def held_out_records(cfg, item_ids: list[str]) -> list[dict]:
    """The held-out items as `POST /items` takes them: id and text fields, from the run's item table."""
    import pandas as pd

    table = pd.read_csv(cfg.data.items, dtype=str, keep_default_na=False).set_index("item_id")
    missing = [i for i in item_ids if i not in table.index]
    if missing:
        raise ValueError(f"{cfg.data.items}: no row for held-out item(s) {missing[:5]} (expected the table the run was prepared from)")
    return item_records(table.to_dict("index"), item_ids, list(cfg.data.text_fields))


def served_positions(url: str, histories: list[list[str]], targets: list[str], batch: int) -> tuple[np.ndarray, list[list[str]]]:
    """Each target's 0-based position in its user's served top-K (K when absent), and the top-K lists."""
    positions, tops = [], []
    for start in range(0, len(histories), batch):
        answer = http("POST", f"{url}/recommend", {"histories": histories[start:start + batch], "k": K}, timeout=120)
        for row, target in zip(answer["results"], targets[start:start + batch]):
            ids = [r["item_id"] for r in row["items"]]
            tops.append(ids)
            positions.append(ids.index(target) if target in ids else K)
    return np.array(positions), tops


def ndcg_of(positions: np.ndarray) -> np.ndarray:
    """Per case: NDCG@K of one relevant item at 0-based `positions` (K: not in the top K)."""
    return np.where(positions < K, 1.0 / np.log2(np.minimum(positions, K - 1) + 2), 0.0)


def hr_ndcg(positions: np.ndarray) -> tuple[float, float]:
    return float((positions < K).mean()), float(ndcg_of(positions).mean())


def measure(run: Path, work: Path, batch: int, shifts: list[float]) -> tuple[list[dict], dict]:
    import torch

    from twotower.configs import load_config
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.trainers.evaluate import load_module

    cfg = load_config([run / "config.yaml"])
    checkpoint = run / "checkpoints" / "best.ckpt"
    data = ShardDataModule(cfg)
    module = load_module(str(checkpoint), data)
    cold = data.catalogue.cold.numpy().astype(bool)
    if not cold.any():
        raise ValueError(f"{run}: no held-out items (fit it with split.cold_item_fraction > 0)")
    with torch.no_grad():
        table = module.catalogue_table()
    offline = offline_ranks(module, data, table)
    shifted = shifted_ndcg(module, data, table, cold, shifts)
    ids = list(data.catalogue.item_ids)
    held_out = np.flatnonzero(cold).tolist()
    new = {ids[i] for i in held_out}
    split_cases = {split: cases(data, split) for split in SPLITS}
    folder = warm_export(cfg, checkpoint, cold, work)
    server = start_server(folder, [], work / "serve.log")
    try:
        warm_histories, warm_targets = split_cases["valid"]
        before, _ = served_positions(server.url, [[ids[i] for i in h] for h in warm_histories], [ids[t] for t in warm_targets], batch)
        records = held_out_records(cfg, [ids[i] for i in held_out])
        started = time.perf_counter()
        for start in range(0, len(records), cfg.serving.max_new_items):
            http("POST", f"{server.url}/items", {"items": records[start:start + cfg.serving.max_new_items]}, timeout=600)
        post_s = time.perf_counter() - started
        rows = []
        for split in SPLITS:
            histories, targets = split_cases[split]
            positions, tops = served_positions(server.url, [[ids[i] for i in h] for h in histories],
                                               [ids[t] for t in targets], batch)
            hr, ndcg = hr_ndcg(positions)
            change = {}
            if split == "valid":  # the same users, the same order: paired per user
                difference = ndcg_of(positions) - ndcg_of(before)
                change = {"ndcg@10_before": float(ndcg_of(before).mean()), "ndcg@10_change": float(difference.mean()),
                          "ndcg@10_change_se": standard_error(difference)}
            hr_off, ndcg_off = hr_ndcg(np.minimum(offline[split], K))
            rows.append({"run": run.name, "mode": cfg.model.mode, "cold_weight": cfg.model.loss.cold_weight, "split": split,
                         "cases": len(targets), "hr@10": hr, "hr@10_offline": hr_off, "ndcg@10": ndcg, "ndcg@10_offline": ndcg_off,
                         "agree": float((positions == np.minimum(offline[split], K)).mean()),
                         "new_share": float(np.mean([sum(i in new for i in top) / K for top in tops])),
                         "post_items_s": post_s, "new_items": len(records), **change})
        return rows, shifted
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-live-items-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = [quick_run(out / "quick")] if args.quick else args.runs
    shifts = sorted({float(b) for b in args.shifts.split(",")} | {0.0, float("-inf")}, reverse=True)
    rows, measured = [], []
    for run in runs:
        served, shifted = measure(run, out / "work" / run.name, args.batch, shifts)
        rows += served
        measured.append((served[0], shifted))
    trade = trade_off(measured, shifts)
    (out / "live_items.json").write_text(json.dumps({"served": rows, "trade_off": trade}, indent=2, default=str) + "\n")
    print(f"bench/live_items.py: {len(runs)} run(s); held-out items POSTed to `twotower serve` on an export without them, "
          f"then POST /recommend for each split's users (top-{K}, history filtered)")
    columns = ["run", "mode", "cold_weight", "split", "cases", "hr@10", "hr@10_offline", "ndcg@10", "ndcg@10_offline", "agree", "new_share"]
    headers = ["run", "mode", "cold_weight", "split", "cases", "HR@10 served", "HR@10 offline", "NDCG@10 served",
               "NDCG@10 offline", "same rank", "new items' share of top-10"]
    shown = [{**r, **{c: f"{r[c]:.4f}" for c in columns[5:9]}, "agree": f"{100 * r['agree']:.1f} %",
              "new_share": f"{100 * r['new_share']:.1f} %"} for r in rows]
    print(markdown_table(shown, columns, headers))
    print("\nWarm users (valid), served NDCG@10 before and after the held-out items were POSTed:")
    warm = [{"run": r["run"], "before": f"{r['ndcg@10_before']:.4f}", "after": f"{r['ndcg@10']:.4f}",
             "change": f"{r['ndcg@10_change']:+.4f} ± {r['ndcg@10_change_se']:.4f}",
             "relative": f"{100 * r['ndcg@10_change'] / r['ndcg@10_before']:+.1f} %" if r["ndcg@10_before"] else "–"}
            for r in rows if r["split"] == "valid"]
    print(markdown_table(warm, ["run", "before", "after", "change", "relative"],
                         ["run", "NDCG@10 before POST /items", "after", "change ± paired SE", "change / before"]))
    print("\nOffline trade-off: held-out items' scores shifted by b, mean over the runs of each mode and cold_weight:")
    shown = [{**r, "valid": f"{r['valid']:.4f}", "cold_valid": f"{r['cold_valid']:.4f}",
              "change": f"{r['change']:+.4f} ± {r['change_se']:.4f}"} for r in trade]
    print(markdown_table(shown, ["mode", "cold_weight", "shift", "runs", "valid", "cold_valid", "change"],
                         ["mode", "cold_weight", "shift b", "runs", "valid NDCG@10", "cold_valid NDCG@10",
                          "warm change vs b = -inf ± paired SE"]))
    for run in dict.fromkeys(r["run"] for r in rows):
        first = next(r for r in rows if r["run"] == run)
        print(f"{run}: POST /items of {first['new_items']} held-out items took {first['post_items_s']:.2f} s "
              f"({1000 * first['post_items_s'] / max(1, first['new_items']):.1f} ms per item)")
    print(f"results: {out / 'live_items.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
