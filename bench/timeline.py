"""The timelines that bench/online.py replays: the built-in generator's events, or a folder of
`interactions.csv` + `items.csv` (`--data ml100k | amazon-office | FOLDER`), in time order, with the
item tables and the overrides each needs, and the frozen-MiniLM model every fit of the bench uses."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = {"ml100k": REPO.parent / "shared" / "data" / "ml-100k", "amazon-office": REPO.parent / "shared" / "data" / "amazon-office"}
DATA_OVERRIDES = {"ml100k": ["data.name=ml100k", "data.text_fields=[title,text]", "data.max_len=200"],
                  "amazon-office": ["data.name=amazon-office", "data.text_fields=[title]"]}
BENCH_CONFIG = ["model.item.train_layers=0", "logger.wandb.mode=disabled", "trainer.patience=2"]
"""The benchmark's model: MiniLM frozen (its pooled vectors cached once per catalogue), so that a fit
is minutes on 2 cores. The learner runs with its defaults (learn.lr 1e-4, learn.replay_fraction 0.33,
learn.history_len 16, learn.replay_len 16, learn.dropout 0, learn.num_threads 1; chosen on the built-in
timeline's first two windows: lr 3e-3 and 3e-4 at replay 0.3 fell below the stale model there or later)."""


def load_timeline(args, work: Path):
    """(events sorted by time, items, config files, overrides)."""
    import pandas as pd

    from twotower.configs import load_config
    from twotower.datamodules.synthetic import generate

    if args.data == "synthetic":
        cfg = load_config([], args.overrides)
        events, items = generate(cfg.data.synthetic)
        extra = []
    else:
        folder = DATA.get(args.data, Path(args.data))
        if not (folder / "interactions.csv").is_file() or not (folder / "items.csv").is_file():
            print(f"bench/online.py: --data {args.data}: {folder} has no interactions.csv + items.csv; skipped")
            return None
        events, items = pd.read_csv(folder / "interactions.csv"), pd.read_csv(folder / "items.csv")
        extra = DATA_OVERRIDES.get(args.data, [f"data.text_fields=[{','.join(c for c in items.columns if c != 'item_id')}]"])
    events = events[["user_id", "item_id", "timestamp"]].astype({"user_id": str, "item_id": str})
    items = items.astype({"item_id": str})
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return events, items, extra


def item_records(items_by_id: dict, ids: list[str], fields: list[str]) -> list[dict]:
    return [{"item_id": i, **{f: str(items_by_id[i][f]) for f in fields if f in items_by_id[i] and isinstance(items_by_id[i][f], str)}}
            for i in ids]


def write_tables(events, items, known: set[str], folder: Path, name: str) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    ev, it = folder / f"{name}.csv", folder / f"{name}_items.csv"
    events.to_csv(ev, index=False)
    items[items["item_id"].isin(known)].to_csv(it, index=False)
    return str(ev), str(it)
