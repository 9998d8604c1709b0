"""The embedded event stream: a folder, no server; any number of processes of this machine (or of
machines sharing the folder over a filesystem with working flock) may append and read.

    FOLDER/events/00000000000000000000.jsonl    a segment: one record a line (records.py), named
    FOLDER/events/00000000000067109021.jsonl    by the log position (bytes) of its first line
    FOLDER/events/.lock                         appends hold it (flock), one at a time
    FOLDER/items/...                            the same for the items log

A record's offset is the log position just after its line, as 20 decimal digits, so that string
order is log order. An append takes the log's lock, cuts off a trailing partial line (what a writer
that crashed in the middle of its write left), starts a new segment when the last one has reached
`segment_bytes`, writes every line of the batch with one write on an O_APPEND descriptor and flushes
it to disk (fsync) before it returns; a failed write is cut off again, so a call appends all its
lines or none. Readers take no lock and return only complete ("\\n"-terminated) lines.
docs/stream.md has the formats and the guarantees."""
from __future__ import annotations

import bisect
import os
import re
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from itertools import islice
from pathlib import Path

from twotower.files import exclusive, fsync_path
from twotower.streaming.base import LOGS, Record, Stream, StreamError
from twotower.streaming.records import decode, encode, item_key

SEGMENT = re.compile(r"([0-9]{20})\.jsonl")
OFFSET = re.compile(r"[0-9]{20}")
READ_BYTES = 1 << 20
"Readers read a segment this much at a time."


def offset(position: int) -> str:
    return f"{position:020d}"


class SegmentLog:
    """One log: its folder of segments. Appending needs the caller to hold `lock`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = folder / ".lock"

    def segments(self) -> list[tuple[int, Path]]:
        """(start position, path) of every segment, oldest first."""
        try:
            names = os.listdir(self.folder)
        except OSError as exc:
            raise StreamError(f"stream log {self.folder}: {exc}") from exc
        return sorted((int(m[1]), self.folder / name) for name in names if (m := SEGMENT.fullmatch(name)))

    def scan(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(position after it, line without its newline) of each complete line after position
        `after`, which must be 0 or the end of a line."""
        segments = self.segments()
        first = bisect.bisect_right([start for start, _ in segments], after) - 1
        if first < 0:
            if after:
                raise StreamError(f"stream log {self.folder}: offset {offset(after)} is past its end (it is empty)")
            return
        for start, path in segments[first:]:
            yield from self._scan_segment(start, path, max(after - start, 0))

    @staticmethod
    def _scan_segment(start: int, path: Path, skip: int) -> Iterator[tuple[int, bytes]]:
        try:
            with open(path, "rb") as f:
                if skip:
                    f.seek(skip - 1)
                    before = f.read(1)
                    if before != b"\n":
                        where = "past the end" if not before else "not the end of a record"
                        raise StreamError(f"{path}: offset {offset(start + skip)} is {where}; is it an offset of this stream?")
                position, pending = skip, b""
                while chunk := f.read(READ_BYTES):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        position += len(line) + 1
                        yield start + position, line
        except OSError as exc:
            raise StreamError(f"{path}: {exc}") from exc

    def end(self) -> int | None:
        """The position after the last complete line (None while there is none)."""
        for start, path in reversed(self.segments()):
            try:
                with open(path, "rb") as f:
                    complete = complete_size(f.fileno())
            except OSError as exc:
                raise StreamError(f"{path}: {exc}") from exc
            if complete:
                return start + complete
        return None

    def append(self, lines: list[bytes], segment_bytes: int) -> list[int]:
        """Write `lines` (each without its newline) after the log's last complete line, all or none,
        durably; the position after each. The caller holds `lock`."""
        segments = self.segments()
        start, path = segments[-1] if segments else (0, self.folder / f"{offset(0)}.jsonl")
        data = b"".join(line + b"\n" for line in lines)
        fd = -1
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            size = complete_size(fd)
            if size < os.fstat(fd).st_size:  # a crashed writer's partial line
                os.ftruncate(fd, size)
            if size >= segment_bytes:
                os.close(fd)
                fd, start, size = -1, start + size, 0
                path = self.folder / f"{offset(start)}.jsonl"
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            if size == 0:  # a new segment: its name must survive a power loss too
                fsync_path(self.folder)
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(f"short write: {written} of {len(data)} bytes")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        except OSError as exc:
            raise StreamError(f"{path}: append failed, nothing appended ({exc})") from exc
        finally:
            if fd >= 0:
                os.close(fd)
        ends, position = [], start + size
        for line in lines:
            position += len(line) + 1
            ends.append(position)
        return ends


def complete_size(fd: int) -> int:
    """The size of the open file `fd` up to and including its last newline."""
    end = os.fstat(fd).st_size
    while end > 0:
        step = min(end, 1 << 16)
        tail = os.pread(fd, step, end - step)
        newline = tail.rfind(b"\n")
        if newline >= 0:
            return end - step + newline + 1
        end -= step
    return 0


class DirectoryStream(Stream):
    """The stream in `folder` (created when missing): one SegmentLog per log. Safe to share
    between threads; every process opens its own."""

    def __init__(self, folder: str | Path, segment_bytes: int = 64 << 20):
        if segment_bytes <= 0:
            raise StreamError(f"segment_bytes={segment_bytes!r}: expected a positive number of bytes")
        self.url, self.segment_bytes = str(folder), segment_bytes
        self.logs = {name: SegmentLog(Path(folder) / name) for name in LOGS}
        for log in self.logs.values():
            try:
                log.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StreamError(f"stream folder {folder}: cannot create {log.folder} ({exc})") from exc
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        "The item ids of the items log up to position `_claims_seen`."
        self._claims_seen = 0

    def _log(self, name: str) -> SegmentLog:
        if name not in self.logs:
            raise StreamError(f"{self.url}: no log {name!r}; the logs are {', '.join(LOGS)}")
        return self.logs[name]

    @contextmanager
    def _appending(self, log: SegmentLog) -> Iterator[None]:
        """This process's threads and every other process, one at a time."""
        with self._lock, exclusive(log.lock):
            yield

    def append_events(self, events: list[dict]) -> list[str]:
        lines = [encode(event, f"event {i}") for i, event in enumerate(events)]
        if not lines:
            return []
        log = self.logs["events"]
        with self._appending(log):
            return [offset(end) for end in log.append(lines, self.segment_bytes)]

    def claim_items(self, items: list[dict]) -> list[bool]:
        keys = [item_key(item, f"item {i}") for i, item in enumerate(items)]
        lines = [encode(item, f"item {i}") for i, item in enumerate(items)]
        if not lines:
            return []
        log = self.logs["items"]
        with self._appending(log):
            for end, line in log.scan(self._claims_seen):  # what other processes appended meanwhile
                item_id = decode(line).get("item_id")
                if item_id is not None:
                    self._claimed.add(str(item_id))
                self._claims_seen = end
            added = []
            for key in keys:
                added.append(key not in self._claimed)
                self._claimed.add(key)
            new = [line for line, fresh in zip(lines, added) if fresh]
            if new:
                try:
                    self._claims_seen = log.append(new, self.segment_bytes)[-1]
                except StreamError:
                    self._claimed.difference_update(k for k, fresh in zip(keys, added) if fresh)
                    raise
        return added

    def read(self, log: str, after: str | None = None, limit: int = 10_000) -> list[Record]:
        segments = self._log(log)
        if after is not None and not OFFSET.fullmatch(after):
            raise StreamError(f"{segments.folder}: offset {after!r} is not an offset of this stream (20 digits)")
        with closing(segments.scan(int(after or 0))) as lines:
            return [Record(offset(end), decode(line)) for end, line in islice(lines, max(limit, 0))]

    def last_offset(self, log: str) -> str | None:
        end = self._log(log).end()
        return None if end is None else offset(end)
