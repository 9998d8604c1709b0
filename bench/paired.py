"""Are two systems really apart? A paired, per-user comparison of trained runs on the data they
were trained on: each run's best checkpoint ranks every valid and test user again (the protocol
and code of `fit`), next to the popularity baseline, and the table gives per system and split

* its NDCG@10 (as `fit` reported it) with the standard error of that mean over users, and
* the mean per-user difference to the first run named, with its paired standard error,
  sd(difference) / sqrt(users): a gap of under two such errors is one that this many users
  cannot tell from noise.

Each split is also cut by whether the user's target and the event before it share a timestamp
(`same second`): there the file order, not time, decides which of the two is the target.

    python bench/paired.py runs/ml100k-id runs/ml100k-id+text       # run folders of `twotower fit`
    python bench/paired.py --metric hr@10 --out per_user.csv RUN...  # another metric; every user's ranks as CSV

The runs must share one prepared data folder (data.dir); the per-user CSV (user_id, split, system,
rank, same_second) is written to a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.files import atomic_file  # noqa: E402
from twotower.tables import markdown_table  # noqa: E402

SPLITS = ("valid", "test")
GROUPS = (("all", None), ("same second", True), ("later", False))
"Rows per system and split: every user, then the users whose target shares its second with the event before it, then the rest."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (config.yaml, checkpoints/best.ckpt)")
    parser.add_argument("--metric", default="ndcg@10", help="hr@K, ndcg@K or mrr@K (default: ndcg@10)")
    parser.add_argument("--out", type=Path, help="also write every user's target rank per system and split to this CSV")
    return parser.parse_args(argv)


def same_second(cases: list[dict]) -> np.ndarray | None:
    """Per evaluation case: does the target share its timestamp with the newest history event?
    None when the shards hold no times (prepared before schema 2)."""
    if any("time.npy" not in c for c in cases):
        return None
    return np.array([len(c["time.npy"]) > 0 and c["time.npy"][-1] == c["json"]["time"] for c in cases], dtype=bool)


def rank_runs(runs: list[Path]) -> tuple[dict, dict[str, list[str]], dict[str, np.ndarray]]:
    """ranks[split][system] (0-based target ranks per user), the user ids and `same_second` per split."""
    import torch

    from twotower.configs import load_config
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.trainers.evaluate import load_module, popularity_ranks

    data, ranks, users, tied = None, {s: {} for s in SPLITS}, {}, {}
    for run in runs:
        for needed in ("config.yaml", "checkpoints/best.ckpt"):
            if not (run / needed).exists():
                raise SystemExit(f"paired: {run} has no {needed} (a run folder written by `twotower fit`)")
        cfg = load_config([run / "config.yaml"])
        if data is None:
            data = ShardDataModule(cfg)
            for split in SPLITS:
                cases = data.cases(split)
                users[split], tied[split] = [c["json"]["user_id"] for c in cases], same_second(cases)
                ranks[split]["popularity"] = popularity_ranks(data, split).numpy()
        elif Path(cfg.data.dir).resolve() != Path(data.folder).resolve():
            raise SystemExit(f"paired: {run} was trained on {cfg.data.dir}, {runs[0]} on {data.folder}: "
                             "a paired comparison needs the same users and targets")
        module = load_module(str(run / "checkpoints" / "best.ckpt"), data)
        with torch.no_grad():
            table = module.catalogue_table()
            for split in SPLITS:
                ranks[split][run.name] = torch.cat([module.target_ranks(h, t, table) for h, t in data.eval_dataloader(split)]).numpy()
    return ranks, users, tied


def metric_of(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user HR/NDCG/MRR@K from 0-based ranks (modules/metrics.py's definitions)."""
    import torch

    from twotower.modules.metrics import metrics_per_user

    return metrics_per_user(torch.from_numpy(ranks), [int(metric.split("@")[1])])[metric].numpy()


def standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def table_rows(ranks: dict, tied: dict[str, np.ndarray], metric: str, base: str) -> list[dict]:
    """Per split, user group and system: the metric's mean and standard error, and the mean
    per-user difference to system `base` with its paired standard error."""
    rows = []
    for split in SPLITS:
        per_user = {name: metric_of(r, metric) for name, r in ranks[split].items()}
        users = len(per_user[base])
        masks = [(group, np.ones(users, dtype=bool) if flag is None else tied[split] == flag) for group, flag in GROUPS
                 if flag is None or tied[split] is not None]
        for group, mask in masks:
            if not mask.any():
                continue
            for name, values in per_user.items():
                diff = values[mask] - per_user[base][mask]
                rows.append({"split": split, "users": group, "n": int(mask.sum()), "system": name, metric: float(values[mask].mean()),
                             "se": standard_error(values[mask]), f"minus {base}": None if name == base else float(diff.mean()),
                             "paired se": None if name == base else standard_error(diff)})
    return rows


def write_per_user(path: Path, ranks: dict, users: dict[str, list[str]], tied: dict[str, np.ndarray]) -> None:
    import pandas as pd

    frames = [pd.DataFrame({"user_id": users[split], "split": split, "system": name, "rank": r, "same_second": tied[split]})
              for split in SPLITS for name, r in ranks[split].items()]
    with atomic_file(path) as partial:
        pd.concat(frames).to_csv(partial, index=False)  # same_second is empty where the shards hold no times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metric.split("@")[0] not in ("hr", "ndcg", "mrr") or not args.metric.split("@")[-1].isdigit():
        raise SystemExit(f"paired: --metric {args.metric}: expected hr@K, ndcg@K or mrr@K")
    if len({run.name for run in args.runs}) < len(args.runs):
        raise SystemExit(f"paired: the run folders must have distinct names (the table's systems): {' '.join(map(str, args.runs))}")
    ranks, users, tied = rank_runs(args.runs)
    if any(t is None for t in tied.values()):
        print("paired: the shards hold no event times (prepared before schema 2): no same-second rows", file=sys.stderr)
    rows = table_rows(ranks, tied, args.metric, args.runs[0].name)
    print(f"Paired per-user {args.metric} of {', '.join(str(r) for r in args.runs)} (best checkpoints) and popularity; "
          f"se: standard error over users; paired se: of the per-user difference to {args.runs[0].name}.")
    print(markdown_table(rows, list(rows[0])))
    for run in args.runs:  # fit's own numbers for the same checkpoints: nothing here may rank differently
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        said = [f"{key} {summary[key]:.4f}" for key in (f"best/val/{args.metric}", f"test/{args.metric}") if key in summary]
        if said:
            print(f"{run.name}: summary.json says {', '.join(said)}")
    if args.out:
        write_per_user(args.out, ranks, users, tied)
        print(f"per-user ranks: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
