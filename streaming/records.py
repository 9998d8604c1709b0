"""How both backends store a record: one JSON object, compact, on one line (a JSON string escapes
its newlines). A stored record that is not a JSON object (a hand edit, a foreign writer, a torn
disk block) reads back as {"_malformed": <its text, truncated>} instead of failing the read, so a
consumer can count and skip it and go on (docs/stream.md)."""
from __future__ import annotations

import json

from twotower.streaming.base import StreamError

MALFORMED = "_malformed"
"The key of the body a bad stored record reads back as."
SHOWN_CHARS = 200
"How much of a malformed record's text its body keeps."


def encode(body: dict, what: str) -> bytes:
    """`body` as one UTF-8 line without its newline; `what` names it in the error ("event 3")."""
    if not isinstance(body, dict):
        raise StreamError(f"{what}: expected a JSON object, got {type(body).__name__}")
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StreamError(f"{what}: not storable as JSON ({exc})") from exc


def decode(raw: bytes) -> dict:
    """The body stored as `raw`, or {"_malformed": ...} when it is not a JSON object."""
    try:
        body = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        body = None
    return body if isinstance(body, dict) else malformed(raw.decode("utf-8", "replace"))


def malformed(text: str) -> dict:
    return {MALFORMED: text[:SHOWN_CHARS]}


def item_key(item: dict, what: str) -> str:
    """The id `claim_items` compares `item` by: its `item_id`, as a string (both backends)."""
    if not isinstance(item, dict) or item.get("item_id") in (None, ""):
        raise StreamError(f"{what}: expected an object with an item_id, got {str(item)[:SHOWN_CHARS]}")
    return str(item["item_id"])
