"""The event stream (`stream.url`): the embedded folder backend or Redis Streams behind one interface."""
from twotower.streaming.base import LOGS, Record, Stream, StreamError
from twotower.streaming.directory import DirectoryStream

__all__ = ["LOGS", "Record", "Stream", "StreamError", "open_stream"]

SUPPORTED = "redis://HOST:PORT/DB[?prefix=NAME], rediss://... (TLS), dir:PATH or a folder path"


def open_stream(url: str, segment_bytes: int = 64 << 20) -> Stream:
    """The stream at `url`: redis://HOST:PORT/DB[?prefix=NAME] (Redis Streams), or a folder path /
    dir:PATH (the embedded backend; created when missing). `segment_bytes`: the embedded backend's
    segment size."""
    scheme = url.partition("://")[0].lower() if "://" in url else None
    if scheme in ("redis", "rediss"):
        try:
            from twotower.streaming.redis_stream import RedisStream
        except ModuleNotFoundError as exc:
            if exc.name != "redis":
                raise
            raise StreamError(f"a {scheme}:// stream.url needs redis-py: pip install 'twotower[stream]'") from exc
        return RedisStream(url)
    if scheme is not None or not url:
        raise StreamError(f"stream.url={url!r}: not a stream this version can open; supported: {SUPPORTED}")
    return DirectoryStream(url.removeprefix("dir:"), segment_bytes)
