"""One task of `twotower prepare`: the users of one partition, split by the protocol
(`split.split_user`) and written as WebDataset shards. The pandas path runs it once over every
user; the engine path (`datamodules.engine`) runs it once per partition of users, in parallel.

A partition is a frame with the columns of `COLUMNS`: item indices, times, action codes, and the
input position of each event (`round`: 0 for a fresh prepare, the append's round for its new
events; `file`, `line`: where it was read). Each user's events are ordered by time, then input
position, so the result does not depend on how rows reached the task."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from twotower.configs.schema import SplitConfig
from twotower.datamodules.readers import DataError
from twotower.datamodules.shards import write_shards
from twotower.datamodules.split import EvalCase, Events, TrainSequence, split_user

COLUMNS = ("user", "item", "time", "action", "round", "file", "line")
"A partition's columns: user id (str), item index, epoch seconds, action code, and input position."
EVALUATION = ("valid", "test", "cold_valid", "cold")
"The evaluation splits every prepare writes (`cold_valid` only where the held-out items are cut in two)."


@dataclass
class Written:
    """What one task wrote: JSON-able, so that an engine can return it to the driver."""

    shards: dict[str, dict[str, int]] = field(default_factory=dict)
    "Split -> {shard path relative to the output folder: samples}."
    train_items: list[int] = field(default_factory=list)
    train_counts: list[int] = field(default_factory=list)
    "Occurrences of each of `train_items` in training sequences (all rounds: popularity)."
    interactions: int = 0
    new_interactions: int = 0
    "Appends: the interactions of the new round (else all)."
    users: int = 0
    train_users: int = 0
    dropped_users: int = 0
    window_sequences: int = 0
    "Appends: the new round's training sequences (users whose training cases grew)."

    def add(self, other: "Written") -> "Written":
        counts = dict(zip(self.train_items, self.train_counts))
        for item, n in zip(other.train_items, other.train_counts):
            counts[item] = counts.get(item, 0) + n
        return Written({s: {**self.shards.get(s, {}), **other.shards.get(s, {})} for s in {*self.shards, *other.shards}},
                       list(counts), list(counts.values()), self.interactions + other.interactions,
                       self.new_interactions + other.new_interactions, self.users + other.users,
                       self.train_users + other.train_users, self.dropped_users + other.dropped_users,
                       self.window_sequences + other.window_sequences)

    def counts(self, num_items: int) -> np.ndarray:
        out = np.zeros(num_items, dtype=np.int64)
        np.add.at(out, np.asarray(self.train_items, dtype=np.int64), np.asarray(self.train_counts, dtype=np.int64))
        return out


def events_member(events: Events) -> dict:
    return {"time.npy": events.times.astype(np.float64), "action.npy": events.actions.astype(np.int16)}


def train_sample(key: str, seq: TrainSequence, round_: int = 0, first_target: int = 1) -> dict:
    """A training sequence; the training cases it holds are its positions `first_target`.. as
    targets, each with every item before it as history (an append's sample carries the user's
    older items as context only: their cases are in the shards of an earlier round)."""
    meta = {"user_id": seq.user_id, "round": round_}
    if first_target > 1:
        meta["first_target"] = first_target
    return {"__key__": key, "seq.npy": seq.events.items.astype(np.int32), **events_member(seq.events), "json": meta}


def eval_sample(key: str, case: EvalCase) -> dict:
    return {"__key__": key, "history.npy": case.history.astype(np.int32), **events_member(case.events),
            "json": {"user_id": case.user_id, "target": case.target, "time": case.time}}


def in_order(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` sorted by user, then time, round, file and line (the protocol's event order)."""
    return frame.sort_values(["user", "time", "round", "file", "line"], kind="stable", ignore_index=True)


def grown(user: str, now: TrainSequence, before: TrainSequence | None) -> int:
    """The first position of `now` (the user's training sequence over all events) that is a new
    training case: where `before` (over the events prepared earlier) stopped. The earlier sequence
    must be where the new one starts: a new event older than a user's prepared events would change
    training cases already written, which an append cannot do."""
    if before is None:
        return 1
    start = len(before.events)
    old, new = before.events, now.events
    if len(new) < start or not (np.array_equal(new.items[:start], old.items) and np.array_equal(new.times[:start], old.times)):
        changed = int(np.argmax(np.r_[(new.items[:start] != old.items[:len(new)]) | (new.times[:start] != old.times[:len(new)]), True]))
        at = new.times[changed] if changed < len(new) else new.times[-1]
        raise DataError(
            f"user {user!r}: a new interaction at t={at:.0f} comes before interactions prepared earlier (up to "
            f"t={old.times[-1]:.0f}); an append can only add later events (set data.since to the end of the prepared "
            "window), or prepare all the events again with --force")
    return max(1, start)


def write_partition(frame: pd.DataFrame, folder: Path, task: str, cold_items: np.ndarray, split: SplitConfig,
                    shard_max_count: int, round_: int = 0, since: float | None = None,
                    cold_valid_items: np.ndarray | None = None) -> Written:
    """Split the users of `frame` and write their shards under `folder/<split>/<split><task>-NNNNNN.tar`.

    round_ = 0: every user's training sequence. round_ > 0 (an append): only the new training cases,
    as sequences of the users whose training cases grew with the events of that round (earlier items
    as context, `first_target` where the new cases start), plus `valid_window`/`test_window`: the
    cases whose target is at or after `since`. Evaluation splits always hold every user.
    `cold_valid_items`: the held-out items of `cold_valid`; None (data prepared before the held-out
    items were cut in two): no `cold_valid` split, every held-out item's case in `cold`."""
    frame = in_order(frame)
    users = frame["user"].to_numpy()
    items, times = frame["item"].to_numpy(), frame["time"].to_numpy(dtype=np.float64)
    actions, rounds = frame["action"].to_numpy().astype(np.int16), frame["round"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(users)].astype(int)

    train: list[tuple[TrainSequence, int]] = []
    evaluation: dict[str, list[EvalCase]] = {name: [] for name in EVALUATION if name != "cold_valid" or cold_valid_items is not None}
    trained: list[np.ndarray] = []
    written = Written(interactions=len(frame), new_interactions=int((rounds == round_).sum()), users=len(starts))
    for start, end in zip(starts, ends):
        user, events = str(users[start]), Events(items[start:end], times[start:end], actions[start:end])
        part = split_user(user, events, cold_items, split, cold_valid_items)
        if part.cold is not None:
            evaluation["cold"].append(part.cold)
        if part.cold_valid is not None:
            evaluation["cold_valid"].append(part.cold_valid)
        if part.dropped:
            written.dropped_users += 1
            continue
        written.train_users += 1
        evaluation["valid"].append(part.valid)
        evaluation["test"].append(part.test)
        trained.append(part.train.events.items)
        new = rounds[start:end] == round_
        if round_ == 0:
            train.append((part.train, 1))
        elif new.any():
            first = grown(user, part.train, split_user(user, events[~new], cold_items, split).train)
            if len(part.train.events) > first:
                train.append((part.train, first))
    if round_ > 0:
        written.window_sequences = len(train)
        evaluation.update({f"{name}_window": [c for c in evaluation[name] if c.time >= since] for name in ("valid", "test")})

    samples = (train_sample(f"{task}{n:09d}", seq, round_, first) for n, (seq, first) in enumerate(train))
    written.shards["train"] = _write(folder, "train", task, samples, shard_max_count)
    for name, cases in evaluation.items():
        written.shards[name] = _write(folder, name, task, (eval_sample(f"{task}{n:09d}", c) for n, c in enumerate(cases)), shard_max_count)
    counts = np.bincount(np.concatenate(trained), minlength=len(cold_items)) if trained else np.zeros(len(cold_items), np.int64)
    used = np.flatnonzero(counts)
    written.train_items, written.train_counts = used.tolist(), counts[used].tolist()
    return written


def _write(folder: Path, split: str, task: str, samples, shard_max_count: int) -> dict[str, int]:
    files = write_shards(folder / split, f"{split}{task}", samples, shard_max_count)
    return {f"{split}/{name}": n for name, n in files.items()}
