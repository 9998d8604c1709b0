"""What `twotower learn` reads off the stream: records checked and turned into events on item
indices (or skipped with a reason), and every user's history so far.

A record the learner cannot use never stops it: it is counted under its reason (`SKIP_REASONS`),
named in the log (the first few of each reason, then every thousandth) and skipped."""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from twotower.modules.histories import time_gap_codes
from twotower.modules.item_text import item_text

log = logging.getLogger("twotower.learn")

EVENT_FIELDS = frozenset({"user_id", "item_id", "timestamp", "event"})
SKIP_REASONS = ("malformed", "unknown_fields", "unknown_item", "bad_item", "known_item")
LOGGED_PER_REASON = 20


class Event(NamedTuple):
    offset: str
    user_id: str
    item_id: str
    item: int
    "Item index in the learner's catalogue."
    time: float
    action: str | None
    code: int
    "Action code (0: none, or a value the model was not trained with)."


class Skipped(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class SkipLog:
    """Counts of skipped records per reason; names them in the log."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, log_name: str, offset: str, error: Skipped) -> None:
        self.counts[error.reason] += 1
        seen = self.counts[error.reason]
        if seen <= LOGGED_PER_REASON or seen % 1000 == 0:
            log.warning(f"skipped {log_name} record at offset {offset} ({error.reason}, #{seen}): {error}")


def _text(value) -> str:
    return str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""


def parse_event(offset: str, body: dict, item_index: dict[str, int], actions: dict[str, int]) -> Event:
    """The event of an `events` record, or Skipped: malformed (not an object, no user_id or item_id,
    a timestamp that is not finite epoch seconds), unknown_fields (a field other than user_id,
    item_id, timestamp, event), unknown_item (an item that is neither in the catalogue nor on the
    stream's `items` log before it)."""
    if not isinstance(body, dict) or "_malformed" in body:
        raise Skipped("malformed", f"not a JSON object: {str(body.get('_malformed', body) if isinstance(body, dict) else body)[:200]!r}")
    extra = sorted(set(body) - EVENT_FIELDS)
    if extra:
        raise Skipped("unknown_fields", f"unknown field(s) {', '.join(map(repr, extra[:10]))}; an event has {', '.join(sorted(EVENT_FIELDS))}")
    user, item = _text(body.get("user_id")), _text(body.get("item_id"))
    if not user or not item:
        raise Skipped("malformed", f"an event needs a user_id and an item_id (strings or numbers), got {body!r:.200}")
    when = body.get("timestamp")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise Skipped("malformed", f"timestamp {when!r:.50}: expected epoch seconds (a finite number)")
    if item not in item_index:
        raise Skipped("unknown_item", f"item {item!r} is not in the catalogue and was not added (POST /items) before this event")
    action = body.get("event")
    action = None if action is None else str(action)
    return Event(offset, user, item, item_index[item], float(when), action, actions.get(action, 0) if action else 0)


def parse_item(body: dict, fields: list[str], item_index: dict[str, int]) -> tuple[str, dict[str, str], str]:
    """(item id, its text fields, its text) of an `items` record, or Skipped: bad_item (no item_id,
    not an object, a field that is not a text field, no text), known_item (in the catalogue already)."""
    if not isinstance(body, dict) or "_malformed" in body:
        raise Skipped("bad_item", f"not a JSON object: {str(body)[:200]!r}")
    item = _text(body.get("item_id"))
    if not item:
        raise Skipped("bad_item", f"no item_id in {body!r:.200}")
    if item in item_index:
        raise Skipped("known_item", f"item {item!r} is in the catalogue already")
    extra = sorted(set(body) - {"item_id", *fields})
    if extra:
        raise Skipped("bad_item", f"item {item!r}: unknown field(s) {', '.join(map(repr, extra[:10]))} (text fields are {', '.join(fields)})")
    record = {name: str(body[name]) for name in fields if body.get(name) is not None}
    text = item_text(record, fields)
    if not text:
        raise Skipped("bad_item", f"item {item!r}: no text in any of {', '.join(fields)}")
    return item, record, text


class UserHistories:
    """Each user's interactions so far in stream order (the prepared ones first): item indices,
    epoch seconds and action codes."""

    def __init__(self):
        self._items: dict[str, list[int]] = {}
        self._times: dict[str, list[float]] = {}
        self._codes: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, user: str) -> bool:
        return user in self._items

    def users(self) -> list[str]:
        return list(self._items)

    def length(self, user: str) -> int:
        return len(self._items.get(user, ()))

    def add(self, user: str, item: int, time: float, code: int) -> None:
        self._items.setdefault(user, []).append(item)
        self._times.setdefault(user, []).append(time)
        self._codes.setdefault(user, []).append(code)

    def add_many(self, users, items, times, codes) -> None:
        for user, item, time, code in zip(users, items, times, codes):
            self.add(str(user), int(item), float(time), int(code))

    def sequence(self, user: str, end: int, length: int, first_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The user's interactions before position `end`, cropped to the newest `length` (a
        training sequence of `length - 1` next-item cases, as `collate_training` reads it), with
        the cases before position `first_target` left out: (items, time-gap codes, action codes,
        how many leading cases to leave out)."""
        start = max(0, end - length)
        times = np.asarray(self._times[user][:end], dtype=np.float64)
        items = np.asarray(self._items[user][start:end], dtype=np.int64)
        gaps = time_gap_codes(np.maximum.accumulate(times))[start:] if len(times) else np.zeros(0, dtype=np.int64)
        codes = np.asarray(self._codes[user][start:end], dtype=np.int64)
        return items, gaps, codes, max(0, first_target - 1 - start)
