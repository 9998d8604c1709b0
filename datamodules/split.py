"""Leave-one-out by time (docs/data.md), with optional cold items held out of training entirely.

Per user, sorted by time (ties keep file order): the last interaction is `test`, the one before
`valid`, the rest `train`; users with fewer than `min_interactions` are dropped. With
`cold_item_fraction > 0` a random share of the interacted items is removed from every sequence
before that split, and the `cold` split asks, for each user who touched a held-out item, for the
first such item given the warm items before it. With no cold items this is exactly the plain
protocol. Every item of a sequence or history keeps its time and action code (the user tower's
optional features)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from twotower.configs.schema import SplitConfig


@dataclass
class Events:
    """A user's interactions in time order: item indices, times and action codes, index-aligned."""

    items: np.ndarray
    times: np.ndarray
    "Epoch seconds (float64)."
    actions: np.ndarray
    "Action codes (manifest.json's `actions`; 0: none)."

    def __getitem__(self, part: slice | np.ndarray) -> "Events":
        return Events(self.items[part].copy(), self.times[part].copy(), self.actions[part].copy())

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class TrainSequence:
    user_id: str
    events: Events


@dataclass
class EvalCase:
    user_id: str
    events: Events
    "The history: the interactions before the target, oldest first."
    target: int
    time: float = 0.0
    "When the target interaction happened (the interactions' timestamp)."

    @property
    def history(self) -> np.ndarray:
        return self.events.items


@dataclass
class Split:
    train: list[TrainSequence]
    "One per user."
    valid: list[EvalCase]
    test: list[EvalCase]
    cold: list[EvalCase]
    cold_items: np.ndarray
    "[num_items] bool: held out of training."
    train_counts: np.ndarray
    "[num_items] occurrences in training sequences (popularity)."
    dropped_users: int


def leave_one_out(interactions: pd.DataFrame, item_index: pd.Series, cfg: SplitConfig) -> Split:
    """`interactions` (user_id, item_id, timestamp, optional action codes in `action`; file order)
    -> Split over item indices given by `item_index` (item id -> contiguous index)."""
    num_items = len(item_index)
    frame = pd.DataFrame({
        "user": interactions["user_id"].to_numpy(),
        "item": item_index.loc[interactions["item_id"]].to_numpy(),
        "time": interactions["timestamp"].to_numpy(dtype=np.float64),
        "action": interactions["action"].to_numpy() if "action" in interactions else np.zeros(len(interactions), np.int16),
    }).sort_values(["user", "time"], kind="stable")

    interacted = np.unique(frame["item"].to_numpy())
    rng = np.random.default_rng(cfg.seed)
    cold_items = np.zeros(num_items, dtype=bool)
    cold_items[rng.choice(interacted, size=round(cfg.cold_item_fraction * len(interacted)), replace=False)] = True

    users = frame["user"].to_numpy()
    items = frame["item"].to_numpy()
    times = frame["time"].to_numpy()
    actions = frame["action"].to_numpy().astype(np.int16)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]

    train, valid, test, cold = [], [], [], []
    dropped = 0
    for start, end in tqdm(zip(starts, ends), total=len(starts), desc="split", unit="user", disable=len(starts) < 100_000):
        user, events = str(users[start]), Events(items[start:end], times[start:end], actions[start:end])
        if len(events) < cfg.min_interactions:
            dropped += 1
            continue
        is_cold = cold_items[events.items]
        warm = events[~is_cold]
        if is_cold.any():
            first = int(np.argmax(is_cold))
            if first > 0:
                cold.append(EvalCase(user, events[:first], int(events.items[first]), float(events.times[first])))
        if len(warm) < cfg.min_interactions:
            dropped += 1
            continue
        train.append(TrainSequence(user, warm[:-2]))
        valid.append(EvalCase(user, warm[:-2], int(warm.items[-2]), float(warm.times[-2])))
        test.append(EvalCase(user, warm[:-1], int(warm.items[-1]), float(warm.times[-1])))

    train_counts = np.bincount(np.concatenate([s.events.items for s in train]) if train else np.zeros(0, int), minlength=num_items)
    return Split(train, valid, test, cold, cold_items, train_counts, dropped)
