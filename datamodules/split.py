"""Leave-one-out by time (docs/data.md), with optional cold items held out of training entirely.

Per user, sorted by time (ties keep file order): the last interaction is `test`, the one before
`valid`, the rest `train`; users with fewer than `min_interactions` are dropped. With
`cold_item_fraction > 0` a random share of the interacted items is removed from every sequence
before that split. The held-out items are cut in two halves: `cold_valid` (`cold_valid_share` of
them, for choosing settings) and `cold` (the rest, for reporting), so that cold-start choices never
look at the reported items. Each half's split asks, for each user who touched one of its items, for
the first such item given the warm items before it (the other half's items are held out, so absent
from that history too). With no cold items this is exactly the plain protocol. Every item of a
sequence or history keeps its time and action code (the user tower's optional features)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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
    cold_valid: list[EvalCase]
    cold_valid_items: np.ndarray
    "[num_items] bool: the held-out items whose cases are `cold_valid` (the rest: `cold`)."
    train_counts: np.ndarray
    "[num_items] occurrences in training sequences (popularity)."
    dropped_users: int


@dataclass
class UserSplit:
    """One user's share of the split (`split_user`)."""

    user_id: str
    train: TrainSequence | None
    valid: EvalCase | None
    test: EvalCase | None
    cold: EvalCase | None
    "The first item of the `cold` half the user touched, given the warm items before it (None: none, or no warm item came first)."
    cold_valid: EvalCase | None = None
    "The same for the `cold_valid` half."

    @property
    def dropped(self) -> bool:
        return self.train is None


def choose_cold_items(interacted: np.ndarray, num_items: int, cfg: SplitConfig) -> np.ndarray:
    """[num_items] bool: `cfg.cold_item_fraction` of the `interacted` item indices (sorted, distinct),
    drawn with `cfg.seed`: the items held out of training. The same on every engine."""
    rng = np.random.default_rng(cfg.seed)
    cold_items = np.zeros(num_items, dtype=bool)
    cold_items[rng.choice(interacted, size=round(cfg.cold_item_fraction * len(interacted)), replace=False)] = True
    return cold_items


def choose_cold_valid(cold_items: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """[num_items] bool: `cfg.cold_valid_share` of the held-out `cold_items`, drawn with `cfg.seed`
    (a stream of its own, so the held-out items themselves are those `choose_cold_items` drew): the
    half whose cases form `cold_valid`. The same on every engine."""
    held_out = np.flatnonzero(cold_items)
    rng = np.random.default_rng([cfg.seed, 1])
    cold_valid = np.zeros(len(cold_items), dtype=bool)
    cold_valid[rng.choice(held_out, size=round(cfg.cold_valid_share * len(held_out)), replace=False)] = True
    return cold_valid


def first_held_out(user: str, events: Events, is_cold: np.ndarray, half: np.ndarray) -> EvalCase | None:
    """The case of the first event in `half` (a mask over `events`, within `is_cold`), its history
    the warm events before it; None when the user touched no item of the half, or no warm one first."""
    if not half.any():
        return None
    first = int(np.argmax(half))
    history = events[:first][~is_cold[:first]]
    return EvalCase(user, history, int(events.items[first]), float(events.times[first])) if len(history) else None


def split_user(user: str, events: Events, cold_items: np.ndarray, cfg: SplitConfig,
               cold_valid_items: np.ndarray | None = None) -> UserSplit:
    """The protocol for one user's `events` (in time order, ties in input order). `cold_valid_items`:
    the held-out items whose cases are `cold_valid`; None (data prepared before the cut): every
    held-out item's case is `cold`, as it was."""
    if len(events) < cfg.min_interactions:
        return UserSplit(user, None, None, None, None)
    is_cold = cold_items[events.items]
    in_valid = cold_valid_items[events.items] if cold_valid_items is not None else np.zeros(len(events), dtype=bool)
    cold = first_held_out(user, events, is_cold, is_cold & ~in_valid)
    cold_valid = first_held_out(user, events, is_cold, in_valid)
    warm = events[~is_cold]
    if len(warm) < cfg.min_interactions:
        return UserSplit(user, None, None, None, cold, cold_valid)
    return UserSplit(user, TrainSequence(user, warm[:-2]),
                     EvalCase(user, warm[:-2], int(warm.items[-2]), float(warm.times[-2])),
                     EvalCase(user, warm[:-1], int(warm.items[-1]), float(warm.times[-1])), cold, cold_valid)


def user_events(frame: pd.DataFrame) -> Iterator[tuple[str, Events]]:
    """(user, events) of a frame of `user`, `item` (index), `time`, `action` columns already in
    input order: each user's events sorted by time, ties kept in input order."""
    frame = frame.sort_values(["user", "time"], kind="stable")
    users = frame["user"].to_numpy()
    items = frame["item"].to_numpy()
    times = frame["time"].to_numpy(dtype=np.float64)
    actions = frame["action"].to_numpy().astype(np.int16)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(users)]
    for start, end in tqdm(zip(starts, ends), total=len(starts), desc="split", unit="user", disable=len(starts) < 100_000):
        yield str(users[start]), Events(items[start:end], times[start:end], actions[start:end])


def indexed(interactions: pd.DataFrame, item_index: pd.Series) -> pd.DataFrame:
    """`interactions` (user_id, item_id, timestamp, optional action codes in `action`) as the
    `user`, `item`, `time`, `action` frame `user_events` reads."""
    return pd.DataFrame({
        "user": interactions["user_id"].to_numpy(),
        "item": item_index.loc[interactions["item_id"]].to_numpy(),
        "time": interactions["timestamp"].to_numpy(dtype=np.float64),
        "action": interactions["action"].to_numpy() if "action" in interactions else np.zeros(len(interactions), np.int16),
    })


def leave_one_out(interactions: pd.DataFrame, item_index: pd.Series, cfg: SplitConfig,
                  cold_items: np.ndarray | None = None, cold_valid_items: np.ndarray | None = None) -> Split:
    """`interactions` (user_id, item_id, timestamp, optional action codes in `action`; input order)
    -> Split over item indices given by `item_index` (item id -> contiguous index). `cold_items`,
    `cold_valid_items`: the held-out items and their cold_valid half decided before (an append keeps
    them); None: drawn by `choose_cold_items` and `choose_cold_valid`."""
    num_items = len(item_index)
    frame = indexed(interactions, item_index)
    if cold_items is None:
        cold_items = choose_cold_items(np.unique(frame["item"].to_numpy()), num_items, cfg)
    if cold_valid_items is None:
        cold_valid_items = choose_cold_valid(cold_items, cfg)
    train, valid, test, cold, cold_valid = [], [], [], [], []
    dropped = 0
    for user, events in user_events(frame):
        part = split_user(user, events, cold_items, cfg, cold_valid_items)
        if part.cold is not None:
            cold.append(part.cold)
        if part.cold_valid is not None:
            cold_valid.append(part.cold_valid)
        if part.dropped:
            dropped += 1
            continue
        train.append(part.train)
        valid.append(part.valid)
        test.append(part.test)
    train_counts = np.bincount(np.concatenate([s.events.items for s in train]) if train else np.zeros(0, int), minlength=num_items)
    return Split(train, valid, test, cold, cold_items, cold_valid, cold_valid_items, train_counts, dropped)
