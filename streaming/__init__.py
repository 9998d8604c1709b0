"""The event stream (`stream.url`): the embedded folder backend or Redis Streams behind one interface."""
from twotower.streaming.base import LOGS, Record, Stream, StreamError

__all__ = ["LOGS", "Record", "Stream", "StreamError", "open_stream"]


def open_stream(url: str, segment_bytes: int = 64 << 20) -> Stream:
    """The stream at `url`: redis://HOST:PORT/DB[?prefix=NAME] (Redis Streams), or a folder path /
    dir:PATH (the embedded backend; created when missing)."""
    raise NotImplementedError("to be implemented (issue 22)")
