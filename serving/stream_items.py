"""A server with an event stream (`stream.url`) serves every item of the stream's `items` log.

At start-up it reads the log from its start and adds the items its export lacks (the ones added
live before a restart, by this server or another); then a daemon thread tails the log every
`stream.poll_interval_s` and adds the items other servers claimed, so that replicas on one stream
converge. Items the server claims itself (`POST /items`) are in its catalogue before the follower
reads them back, and are skipped then.

A record that cannot be an item (one the backend could not parse, no item_id, no text in the
model's text fields) is skipped and logged; an id-mode model cannot embed new items, so it skips
them all, with a log line. An error reading or embedding is logged and retried at the next poll
from the last offset applied: the follower never stops."""
from __future__ import annotations

import logging
import threading

from twotower.modules.item_text import item_texts
from twotower.serving.recommender import Recommender
from twotower.streaming import Record, Stream

log = logging.getLogger("twotower.serve")

PAGE = 1000
"Records read (and embedded) at a time."


def item_records(records: list[Record], text_fields: list[str]) -> list[dict[str, str]]:
    """The bodies of `records` that are items, as `Recommender.follow` takes them (item_id and the
    text fields, as strings); the others are logged and left out."""
    items = []
    for record in records:
        body = record.body
        item_id = body.get("item_id") if isinstance(body, dict) and "_malformed" not in body else None
        if not isinstance(item_id, (str, int)) or item_id == "":
            log.warning("stream items log: record %s is not an item (no item_id, or unreadable): %.200r; skipped",
                        record.offset, body)
            continue
        item = {"item_id": str(item_id), **{f: str(body[f]) for f in text_fields if body.get(f) is not None}}
        if not item_texts([item], text_fields)[0]:
            log.warning("stream items log: item %r (record %s) has no text in any of %s; skipped",
                        item["item_id"], record.offset, ", ".join(text_fields))
            continue
        items.append(item)
    return items


class ItemFollower:
    """Keeps `recommender`'s catalogue up to date with `stream`'s items log; `offset` is the log
    offset the server has caught up to (None before the first record)."""

    def __init__(self, recommender: Recommender, stream: Stream, interval: float):
        self.recommender, self.stream, self.interval = recommender, stream, interval
        self.offset: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-items", daemon=True)

    def catch_up(self) -> int:
        """Apply every record after `offset`; returns how many items were added."""
        added = 0
        while records := self.stream.read("items", self.offset, PAGE):
            if self.recommender.embeds_new_items:
                items = item_records(records, list(self.recommender.cfg.data.text_fields))
                added += len(self.recommender.follow(items))
            else:
                log.info("model.mode=id: %d item(s) of the stream's items log skipped (no text tower to embed them; "
                         "they become recommendable after retraining)", len(records))
            self.offset = records[-1].offset
        return added

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                added = self.catch_up()
                if added:
                    log.info("added %d item(s) from the stream's items log (now at offset %s)", added, self.offset)
            except Exception:  # never let the follower die: retried from the last offset applied
                log.exception("following the items log of %s failed at offset %s; retrying in %g s",
                              self.stream.url, self.offset, self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
