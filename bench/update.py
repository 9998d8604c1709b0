"""How much `twotower update` recovers on a later time window, against the stale model and a full
retrain, on the same users with the same metrics.

The built-in data is cut in time and written as files, as a live system would see it: events
before `--cut` (a share of the timeline) and the items they touch are what the stale model was
trained on; the later events arrive with the whole catalogue (items first seen after the cut are
new) through `prepare --append`. Every model is ranked on `test_window`: each user active after the
cut, their newest event, over the full (grown) catalogue.

    python bench/update.py                       # id mode, the default synthetic data (3,000 users)
    python bench/update.py --mode text --epochs 3 # the text tower (slower)
    python bench/update.py --quick               # a smoke run (small data, 1-2 epochs)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twotower.configs import load_config  # noqa: E402
from twotower.datamodules.prepare import prepare_append, read_manifest  # noqa: E402
from twotower.datamodules.synthetic import TIMELINE, write_time_split  # noqa: E402
from twotower.tables import markdown_table  # noqa: E402
from twotower.trainers.evaluate import evaluate_checkpoint  # noqa: E402
from twotower.trainers.fit import fit  # noqa: E402
from twotower.trainers.update import update  # noqa: E402

METRICS = ("hr@10", "ndcg@10", "mrr@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="id", choices=["id", "text", "id+text"])
    parser.add_argument("--cut", type=float, default=0.7, help="share of the timeline the stale model saw (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the stale fit and of the full retrain")
    parser.add_argument("--update-epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 users, 2 epochs: a smoke run")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.update_epochs = 2, 1
        args.overrides = ["data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.max_len=20", *args.overrides]
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-update-"))
    cut = args.cut * TIMELINE
    common = [f"model.mode={args.mode}", f"data.dir={work / 'data'}", "logger.wandb.mode=disabled", "data.source=table", *args.overrides]
    tables = write_time_split(load_config([], args.overrides).data.synthetic, cut, work / "tables")
    early = [f"data.interactions={tables['early']}", f"data.items={tables['early_items']}"]
    print(f"bench/update.py: mode={args.mode}, cut at {args.cut:.0%} of the timeline (t={cut:.0f}), stale/retrain epochs "
          f"{args.epochs}, update epochs {args.update_epochs}, overrides {args.overrides}; "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")

    rows = {}
    started = time.time()
    fit(load_config([], common + early + [f"trainer.max_epochs={args.epochs}", f"run.dir={work / 'stale'}"]))
    stale_s = time.time() - started
    stale_ckpt = str(work / "stale" / "checkpoints" / "best.ckpt")

    prepare_append(load_config([], common + [f"data.interactions={tables['late']}", f"data.items={tables['all_items']}"]))
    started = time.time()
    summary = update(load_config([work / "stale" / "config.yaml"], [f"update.epochs={args.update_epochs}"]), stale_ckpt, work / "update")
    update_s = time.time() - started
    rows["stale"] = ({m: summary[f"stale/test_window/{m}"] for m in METRICS}, f"events < cut, {args.epochs} epochs", stale_s)
    rows["updated"] = ({m: summary[f"updated/test_window/{m}"] for m in METRICS},
                       f"+ window, {args.update_epochs} epochs, replay {load_config([], []).update.replay_fraction:.0%}", update_s)

    # Full retrain from scratch on everything (the base config finds the appended folder up to date).
    started = time.time()
    retrain_cfg = load_config([], common + early + [f"trainer.max_epochs={args.epochs}", f"run.dir={work / 'retrain'}"])
    fit(retrain_cfg)
    retrain_s = time.time() - started
    retrained = evaluate_checkpoint(retrain_cfg, str(work / "retrain" / "checkpoints" / "best.ckpt"), "test_window")
    rows["full retrain"] = ({m: retrained[f"test_window/{m}"] for m in METRICS}, f"all events, {args.epochs} epochs", retrain_s)
    rows["popularity"] = ({m: summary[f"popularity/test_window/{m}"] for m in METRICS}, "all events", 0.0)

    window = summary["window"]
    appended = read_manifest(work / "data")["appends"][-1]
    print(f"\ntest_window: {window['new_users']} users with events after the cut, their newest event ranked over the full "
          f"catalogue, grown by {appended['new_items']} items first seen after the cut\n")
    stale_ndcg = rows["stale"][0]["ndcg@10"]
    columns = ["model", "trained on", "wall s", *(m.upper() for m in METRICS), "NDCG@10 vs stale"]
    print(markdown_table([{"model": name, "trained on": trained_on, "wall s": f"{wall:.0f}",
                           **{m.upper(): f"{metrics[m]:.4f}" for m in METRICS},
                           "NDCG@10 vs stale": f"{metrics['ndcg@10'] / stale_ndcg:.2f}x"}
                          for name, (metrics, trained_on, wall) in rows.items()], columns))
    print(f"\nupdate kept: {summary['kept']}; working folder {work}")


if __name__ == "__main__":
    main()
