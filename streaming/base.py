"""The event stream's interface: two append-only logs, `events` and `items`, each totally ordered.

    events   one record per interaction: {"user_id", "item_id", "timestamp"[, "event"]}
    items    one record per new item: {"item_id", <text fields>}; an item id is claimed at most once

A record's offset is an opaque string, increasing within its log; `read(log, after)` returns the
records after `after` (None: from the start) in log order, so a reader that commits the offset of
the last record it used, together with what it did with it, resumes without losing or repeating
any (delivery is at least once; offsets make it exactly once). Appends are durable when they return."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

LOGS = ("events", "items")


class StreamError(RuntimeError):
    """The stream cannot be opened, read or written (names the stream and the cause)."""


class Record(NamedTuple):
    offset: str
    "Position in its log (opaque; pass it back to `read` as `after`)."
    body: dict
    "The record as appended."


class Stream(ABC):
    url: str

    @abstractmethod
    def append_events(self, events: list[dict]) -> list[str]:
        """Append `events` (in this order, contiguous in the log) and return their offsets. All or
        nothing: when it raises, none was appended."""

    @abstractmethod
    def claim_items(self, items: list[dict]) -> list[bool]:
        """Insert-if-absent by `item_id`: each item whose id no record of the `items` log has yet is
        appended (True); one whose id is there already is not (False). Atomic per item across every
        writer of the stream: of two writers racing for one id, exactly one gets True."""

    @abstractmethod
    def read(self, log: str, after: str | None = None, limit: int = 10_000) -> list[Record]:
        """At most `limit` records of `log` ("events" or "items") after offset `after`, oldest first."""

    @abstractmethod
    def last_offset(self, log: str) -> str | None:
        """The offset of the newest record of `log` (None while it is empty)."""

    def close(self) -> None:
        """Release connections and file handles."""

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
