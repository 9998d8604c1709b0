"""The Redis backend (`redis://HOST:PORT/DB[?prefix=NAME]`, or rediss:// with TLS): each log is a
Redis stream whose entries have one field, `body` (the record as JSON, records.py).

    PREFIX:events      the events log (XADD; an offset is the entry id, "<ms>-<seq>")
    PREFIX:items       the items log
    PREFIX:item_ids    hash: item id -> the offset of its record in the items log (the claims)

PREFIX is "twotower" unless the URL says otherwise. Entry ids increase within a stream but are not
ordered as strings; `read` hands them to Redis (XRANGE from the exclusive start "(" + offset), so
callers treat them as opaque. An append is one MULTI/EXEC transaction; a claim is one Lua script,
which Redis runs atomically: of two writers racing for an id, the second finds it in the hash.
Durable when they return only where the server runs with appendonly yes and appendfsync always
(docs/stream.md)."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from twotower.streaming.base import LOGS, Record, Stream, StreamError
from twotower.streaming.records import decode, encode, item_key, malformed

CLAIM = """
local added = {}
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    added[#added + 1] = 0
  else
    redis.call('HSET', KEYS[1], ARGV[i], redis.call('XADD', KEYS[2], '*', 'body', ARGV[i + 1]))
    added[#added + 1] = 1
  end
end
return added
"""
"KEYS: the claims hash, the items stream; ARGV: item id, body, item id, body, ...; 1 for each appended."


def split_url(url: str) -> tuple[str, str, str]:
    """(URL for redis-py without `prefix`, prefix, URL to show in messages: no password)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    plain = urlunsplit(parts._replace(query=urlencode([(n, v) for n, v in query if n != "prefix"])))
    user, _, host = parts.netloc.rpartition("@")
    shown = urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")) if ":" in user else url
    prefix = next((value for name, value in query if name == "prefix"), "twotower")
    if not prefix:
        raise StreamError(f"stream.url={shown}: an empty ?prefix=")
    return plain, prefix, shown


class RedisStream(Stream):
    """The stream at `url`; connects (and fails with a StreamError naming it) when made."""

    def __init__(self, url: str):
        plain, self.prefix, self.url = split_url(url)
        try:
            # query options of the URL (?socket_timeout=...) override these
            self.client = redis.Redis.from_url(plain, socket_connect_timeout=5, socket_timeout=30)
        except ValueError as exc:
            raise StreamError(f"stream.url={self.url}: {exc}") from exc
        self._claim = self.client.register_script(CLAIM)
        self._call("connect", self.client.ping)

    def _key(self, log: str) -> str:
        if log not in LOGS:
            raise StreamError(f"{self.url}: no log {log!r}; the logs are {', '.join(LOGS)}")
        return f"{self.prefix}:{log}"

    def _call(self, doing: str, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise StreamError(f"Redis stream {self.url}: {doing} failed: {exc}") from exc

    def append_events(self, events: list[dict]) -> list[str]:
        lines = [encode(event, f"event {i}") for i, event in enumerate(events)]
        if not lines:
            return []
        pipe = self.client.pipeline(transaction=True)
        for line in lines:
            pipe.xadd(self._key("events"), {"body": line})
        return [entry_id.decode() for entry_id in self._call("append events", pipe.execute)]

    def claim_items(self, items: list[dict]) -> list[bool]:
        args = []
        for i, item in enumerate(items):
            args += [item_key(item, f"item {i}"), encode(item, f"item {i}")]
        if not args:
            return []
        added = self._call("claim items", self._claim, keys=[f"{self.prefix}:item_ids", self._key("items")], args=args)
        return [bool(flag) for flag in added]

    def read(self, log: str, after: str | None = None, limit: int = 10_000) -> list[Record]:
        key = self._key(log)
        if limit <= 0:
            return []
        entries = self._call(f"read {log} after {after!r}", self.client.xrange, key, min="-" if after is None else f"({after}", count=limit)
        return [Record(entry_id.decode(), body_of(fields)) for entry_id, fields in entries]

    def last_offset(self, log: str) -> str | None:
        entries = self._call(f"read {log}", self.client.xrevrange, self._key(log), count=1)
        return entries[0][0].decode() if entries else None

    def close(self) -> None:
        self.client.close()


def body_of(fields: dict[bytes, bytes]) -> dict:
    """The record an entry holds; {"_malformed": ...} when it is not one this module wrote."""
    raw = fields.get(b"body")
    return malformed(repr(fields)) if raw is None else decode(raw)
