"""What a prepared folder holds, engine- and shard-boundary-free: its training cases and evaluation
cases by user and item id, for comparing two preparations of the same events."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from twotower.datamodules.shards import iter_all


def training_cases(folder: Path) -> Counter:
    """(user, target item id, history item ids) of every training case the shards hold: each
    sample's positions from its `first_target` on, each with every item before it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    ids = json.loads((folder / manifest["item_ids"]).read_text())
    cases = Counter()
    for sample in iter_all([str(folder / s) for s in manifest["shards"]["train"]]):
        seq = [ids[i] for i in sample["seq.npy"]]
        for j in range(sample["json"].get("first_target", 1), len(seq)):
            cases[(sample["json"]["user_id"], seq[j], tuple(seq[:j]))] += 1
    return cases


def evaluation_cases(folder: Path, split: str) -> Counter:
    manifest = json.loads((folder / "manifest.json").read_text())
    ids = json.loads((folder / manifest["item_ids"]).read_text())
    return Counter((s["json"]["user_id"], ids[s["json"]["target"]], s["json"]["time"], tuple(ids[i] for i in s["history.npy"]))
                   for s in iter_all([str(folder / name) for name in manifest["shards"][split]]))


def item_tokens(folder: Path) -> dict[str, tuple]:
    """Item id -> (token ids, text, training count, held out) of the item shards."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s["json"]["item_id"]: (tuple(s["tokens.npy"].tolist()), s["txt"], s["json"]["train_count"], s["json"]["cold"])
            for s in iter_all([str(folder / name) for name in manifest["shards"]["items"]])}
