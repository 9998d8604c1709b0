"""Settings of the event stream (`stream.*`): where `serve` writes the events and items it accepts
and where `twotower learn` reads them from (`twotower.streaming`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class StreamConfig:
    """The event stream: the source of truth for activity after the prepared data."""

    url: Optional[str] = None
    "Where the stream lives: a folder path or dir:PATH (embedded: append-only JSONL segments, no server; several processes may write and read) | redis://HOST:PORT/DB (Redis Streams; ?prefix=NAME to keep several streams in one database) | null: no stream (serve keeps live items in memory only)."
    poll_interval_s: float = 0.5
    "Readers that follow the stream (the learner, a server's item follower) look for new records this often when there are none."
    segment_bytes: int = 64 << 20
    "Embedded stream: a segment file is closed and a new one started past this size."

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError(f"stream.poll_interval_s={self.poll_interval_s!r}: expected seconds > 0")
        if self.segment_bytes <= 0:
            raise ValueError(f"stream.segment_bytes={self.segment_bytes!r}: expected a positive number of bytes")
