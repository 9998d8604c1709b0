"""Leave-one-out by time (SPEC.md), with optional cold items held out of training entirely.

Per user, sorted by time (ties keep file order): the last interaction is `test`, the one before
`valid`, the rest `train`; users with fewer than `min_interactions` are dropped. With
`cold_item_fraction > 0` a random share of the interacted items is removed from every sequence
before that split, and the `cold` split asks, for each user who touched a held-out item, for the
first such item given the warm items before it. With no cold items this is exactly the plain
protocol."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from configs.schema import SplitConfig


@dataclass
class EvalCase:
    user_id: str
    history: np.ndarray
    "Item indices before the target, oldest first."
    target: int
    time: float = 0.0
    "When the target interaction happened (the interactions' timestamp)."


@dataclass
class Split:
    train: list[tuple[str, np.ndarray]]
    "(user id, training sequence of item indices), one per user."
    valid: list[EvalCase]
    test: list[EvalCase]
    cold: list[EvalCase]
    cold_items: np.ndarray
    "[num_items] bool: held out of training."
    train_counts: np.ndarray
    "[num_items] occurrences in training sequences (popularity)."
    dropped_users: int


def leave_one_out(interactions: pd.DataFrame, item_index: pd.Series, cfg: SplitConfig) -> Split:
    """`interactions` (user_id, item_id, timestamp; file order) -> Split over item indices
    given by `item_index` (item id -> contiguous index)."""
    num_items = len(item_index)
    frame = pd.DataFrame({
        "user": interactions["user_id"].to_numpy(),
        "item": item_index.loc[interactions["item_id"]].to_numpy(),
        "time": interactions["timestamp"].to_numpy(),
    }).sort_values(["user", "time"], kind="stable")

    interacted = np.unique(frame["item"].to_numpy())
    rng = np.random.default_rng(cfg.seed)
    cold_items = np.zeros(num_items, dtype=bool)
    cold_items[rng.choice(interacted, size=round(cfg.cold_item_fraction * len(interacted)), replace=False)] = True

    users = frame["user"].to_numpy()
    items = frame["item"].to_numpy()
    times = frame["time"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]

    train, valid, test, cold = [], [], [], []
    dropped = 0
    for start, end in zip(starts, ends):
        user, seq, when = str(users[start]), items[start:end], times[start:end]
        if len(seq) < cfg.min_interactions:
            dropped += 1
            continue
        is_cold = cold_items[seq]
        warm, warm_when = seq[~is_cold], when[~is_cold]
        if is_cold.any():
            first = int(np.argmax(is_cold))
            if first > 0:
                cold.append(EvalCase(user, seq[:first].copy(), int(seq[first]), float(when[first])))
        if len(warm) < cfg.min_interactions:
            dropped += 1
            continue
        train.append((user, warm[:-2].copy()))
        valid.append(EvalCase(user, warm[:-2].copy(), int(warm[-2]), float(warm_when[-2])))
        test.append(EvalCase(user, warm[:-1].copy(), int(warm[-1]), float(warm_when[-1])))

    train_counts = np.bincount(np.concatenate([s for _, s in train]) if train else np.zeros(0, int), minlength=num_items)
    return Split(train, valid, test, cold, cold_items, train_counts, dropped)
