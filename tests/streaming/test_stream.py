"""The event stream's two backends against the same cases: the embedded folder, and Redis Streams on a
real redis-server that this module starts on a free port (appendonly, fsync always; skipped where
redis-server is not on PATH). Writers run as separate processes where the case is about processes."""
from __future__ import annotations

import json
import multiprocessing
import random
import sys
import threading
import uuid
from itertools import pairwise
from pathlib import Path

import pytest

from twotower.streaming import StreamError, open_stream

from helpers import REDIS_SERVER, free_port, raises, start_redis, stop_redis

SEGMENT_BYTES = 4096
"Small enough that the multi-process cases roll segments many times."
spawn = multiprocessing.get_context("spawn")


@pytest.fixture(params=["dir", "redis"])
def url(request, tmp_path) -> str:
    """A new, empty stream of each backend."""
    if request.param == "dir":
        return f"dir:{tmp_path / 'stream'}"
    return f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex[:12]}"


def opened(url: str):
    return open_stream(url, segment_bytes=SEGMENT_BYTES)


def order(offset: str) -> tuple[int, ...]:
    """Log order of either backend's offsets (folder: a position; Redis: "ms-seq"), for the checks."""
    return tuple(int(part) for part in offset.split("-"))


def read_all(stream, log: str, page: int = 97) -> list:
    """Every record of `log`, page by page, each page resuming after the previous one's last offset."""
    records, after = [], None
    while batch := stream.read(log, after=after, limit=page):
        records += batch
        after = batch[-1].offset
    return records


def event(user: str, seq: int) -> dict:
    return {"user_id": user, "item_id": f"i{seq % 7}", "timestamp": 1_700_000_000 + seq, "seq": seq}


def test_appended_events_read_back_in_order_and_read_after_an_offset_resumes_exactly(url):
    with opened(url) as stream:
        assert stream.read("events") == [] and stream.last_offset("events") is None and stream.append_events([]) == []
        events = [event("u1", i) for i in range(5)] + [{"user_id": "ü", "item_id": "x\ny", "timestamp": 1.5, "event": "click"}]
        offsets = stream.append_events(events[:4]) + stream.append_events(events[4:])
        records = stream.read("events")
    assert [r.body for r in records] == events and [r.offset for r in records] == offsets
    assert all(order(a) < order(b) for a, b in pairwise(offsets))
    with opened(url) as again:  # another reader of the same stream
        assert again.last_offset("events") == offsets[-1] and again.last_offset("items") is None
        for i, offset in enumerate(offsets):
            assert again.read("events", after=offset) == records[i + 1:]
        assert again.read("events", limit=2) == records[:2]
        assert again.read("events", after=offsets[1], limit=3) == records[2:5]
        assert again.read("items") == []


def _write(url: str, writer: int, count: int, out: str, barrier) -> None:
    """One writer process: `count` events of user w<writer>, numbered, in batches of 1 to 5."""
    rng, sent = random.Random(writer), {}
    barrier.wait()
    with opened(url) as stream:
        seq = 0
        while seq < count:
            batch = [event(f"w{writer}", s) for s in range(seq, min(count, seq + rng.randint(1, 5)))]
            for e, offset in zip(batch, stream.append_events(batch)):
                sent[offset] = e
            seq += len(batch)
    Path(out).write_text(json.dumps(sent))


def run_processes(target, args_of, n: int) -> None:
    barrier = spawn.Barrier(n)
    processes = [spawn.Process(target=target, args=(*args_of(i), barrier)) for i in range(n)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0] * n


def test_concurrent_writer_processes_each_event_once_each_writers_order_kept(url, tmp_path):
    writers, count = 4, 200
    run_processes(_write, lambda w: (url, w, count, str(tmp_path / f"sent{w}.json")), writers)
    with opened(url) as stream:
        records = read_all(stream, "events")
    assert len(records) == writers * count
    assert all(order(a.offset) < order(b.offset) for a, b in pairwise(records))
    for w in range(writers):
        assert [r.body["seq"] for r in records if r.body["user_id"] == f"w{w}"] == list(range(count))
    sent = {}
    for w in range(writers):
        sent.update(json.loads((tmp_path / f"sent{w}.json").read_text()))
    assert sent == {r.offset: r.body for r in records}, "the offsets append_events returned are not where the events are"
    if url.startswith("dir:"):
        assert len(list(Path(url[4:], "events").glob("*.jsonl"))) > 5, "expected the segments to roll"


ITEM_IDS = [f"item-{i}" for i in range(40)]


def _claim(url: str, writer: int, out: str, barrier) -> None:
    """One process claiming every id of ITEM_IDS, shuffled, in batches of 1 to 4."""
    rng, won = random.Random(writer), {}
    ids = rng.sample(ITEM_IDS, len(ITEM_IDS))
    barrier.wait()
    with opened(url) as stream:
        while ids:
            size = rng.randint(1, 4)
            batch, ids = ids[:size], ids[size:]
            items = [{"item_id": i, "title": f"by {writer}"} for i in batch]
            won.update(zip(batch, stream.claim_items(items)))
    Path(out).write_text(json.dumps(won))


def test_processes_racing_for_the_same_item_ids_each_id_claimed_once(url, tmp_path):
    writers = 4
    run_processes(_claim, lambda w: (url, w, str(tmp_path / f"won{w}.json")), writers)
    won = [json.loads((tmp_path / f"won{w}.json").read_text()) for w in range(writers)]
    winners = {i: [w for w in range(writers) if won[w][i]] for i in ITEM_IDS}
    assert all(len(w) == 1 for w in winners.values()), winners
    with opened(url) as stream:
        items = read_all(stream, "items", page=7)
        assert sorted(r.body["item_id"] for r in items) == sorted(ITEM_IDS)
        assert all(r.body["title"] == f"by {winners[r.body['item_id']][0]}" for r in items)
        assert stream.claim_items([{"item_id": ITEM_IDS[0]}, {"item_id": "new"}, {"item_id": "new"}]) == [False, True, False]


def test_threads_sharing_one_stream_claim_each_id_once(url):
    results = []
    with opened(url) as stream:
        def claim(t: int) -> None:
            results.append(stream.claim_items([{"item_id": i, "by": t} for i in ITEM_IDS[:20]]))

        threads = [threading.Thread(target=claim, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [sum(column) for column in zip(*results)] == [1] * 20
        assert len(stream.read("items")) == 20


def test_a_failing_append_appends_nothing(url):
    with opened(url) as stream:
        stream.append_events([event("u", 0)])
        raises(lambda: stream.append_events([event("u", 1), {"user_id": "u", "item_id": object()}]), "event 1", error=StreamError)
        raises(lambda: stream.append_events([event("u", 1), {"timestamp": float("nan")}]), "event 1", error=StreamError)
        raises(lambda: stream.claim_items([{"item_id": "a"}, {"title": "no id"}]), "item 1", "item_id", error=StreamError)
        assert [r.body for r in stream.read("events")] == [event("u", 0)] and stream.read("items") == []


def test_a_crashed_writers_partial_line_is_never_read_and_is_cut_off_by_the_next_append(tmp_path):
    with opened(f"dir:{tmp_path}") as stream:
        first = stream.append_events([event("u", 0), event("u", 1)])
        segment = tmp_path / "events" / f"{0:020d}.jsonl"
        with open(segment, "ab") as f:
            f.write(b'{"user_id": "crashed", "item_id": "i0", "timest')
        assert [r.offset for r in stream.read("events")] == first and stream.last_offset("events") == first[-1]
        stream.append_events([event("u", 2)])
        assert [r.body["seq"] for r in stream.read("events")] == [0, 1, 2]
        assert b"crashed" not in segment.read_bytes()


def test_a_short_write_is_cut_off_again(tmp_path, monkeypatch):
    from twotower.streaming import directory

    with opened(f"dir:{tmp_path}") as stream:
        stream.append_events([event("u", 0)])
        real_write = directory.os.write
        monkeypatch.setattr(directory.os, "write", lambda fd, data: real_write(fd, data[:len(data) // 2]))
        raises(lambda: stream.append_events([event("u", 1), event("u", 2)]), "short write", "nothing appended", error=StreamError)
        monkeypatch.undo()
        assert [r.body for r in stream.read("events")] == [event("u", 0)]
        assert (tmp_path / "events" / f"{0:020d}.jsonl").read_bytes().count(b"\n") == 1


def test_a_reader_resuming_from_its_committed_offset_sees_every_later_record_once(url, tmp_path):
    """The consumer commits (offset, what it made of the records) in one file write; a crash between
    a read and its commit makes it read those records again, never skip or count them twice."""
    state = tmp_path / "consumer.json"

    def consume(stream, pages: int | None, crash: bool = False) -> None:
        while pages is None or pages > 0:
            committed = json.loads(state.read_text()) if state.exists() else {"offset": None, "seen": []}
            batch = stream.read("events", after=committed["offset"], limit=3)
            if not batch or crash and pages == 1:
                return
            state.write_text(json.dumps({"offset": batch[-1].offset, "seen": committed["seen"] + [r.body["seq"] for r in batch]}))
            pages = None if pages is None else pages - 1

    with opened(url) as writer, opened(url) as reader:
        writer.append_events([event("u", i) for i in range(10)])
        consume(reader, pages=3, crash=True)  # two pages committed, the third read and lost
        writer.append_events([event("u", i) for i in range(10, 17)])
    with opened(url) as restarted:
        consume(restarted, pages=None)
    assert json.loads(state.read_text())["seen"] == list(range(17))


def inject(url: str, log: str, raw: list[bytes]) -> None:
    """Write `raw` records into `log` behind the backend's back (a foreign or broken writer)."""
    if url.startswith("dir:"):
        folder = Path(url[4:], log)
        with open(max(folder.glob("*.jsonl")), "ab") as f:
            f.write(b"".join(line + b"\n" for line in raw))
    else:
        import redis

        base, _, prefix = url.partition("?prefix=")
        client = redis.Redis.from_url(base)
        for body in raw:
            client.xadd(f"{prefix}:{log}", {"body": body})
        client.xadd(f"{prefix}:{log}", {"other": b"field"})
        client.close()


def test_malformed_records_read_back_marked_and_do_not_stop_the_reader_or_the_claims(url):
    with opened(url) as stream:
        stream.append_events([event("u", 0)])
        inject(url, "events", [b"not json", b"[1, 2]", b"\xff\xfe{"])
        stream.append_events([event("u", 1)])
        records = stream.read("events")
        bodies = [r.body for r in records]
        assert bodies[0] == event("u", 0) and bodies[-1] == event("u", 1)
        marked = [b["_malformed"] for b in bodies[1:-1]]
        assert marked[:3] == ["not json", "[1, 2]", "\ufffd\ufffd{"] and all(set(b) == {"_malformed"} for b in bodies[1:-1])
        assert stream.read("events", after=records[2].offset) == records[3:]
        stream.claim_items([{"item_id": "a"}])
        inject(url, "items", [b"{broken", b'{"item_id": "b"'])
        assert stream.claim_items([{"item_id": "a"}, {"item_id": "b"}]) == [False, True]


def test_tiny_segments_roll_on_every_append_and_reads_cross_them(tmp_path):
    folder = tmp_path / "stream"
    with open_stream(str(folder), segment_bytes=1) as stream:
        offsets = [o for i in range(6) for o in stream.append_events([event("u", 2 * i), event("u", 2 * i + 1)])]
        segments = sorted(p.name for p in (folder / "events").glob("*.jsonl"))
        assert segments == [f"{0:020d}.jsonl"] + [f"{o}.jsonl" for o in offsets[1:-1:2]]
        records = stream.read("events")
        assert [r.body["seq"] for r in records] == list(range(12)) and [r.offset for r in records] == offsets
        for i, offset in enumerate(offsets):
            assert stream.read("events", after=offset, limit=3) == records[i + 1:i + 4]
    with open_stream(f"dir:{folder}") as big:  # a larger segment size: appends go to the last segment
        big.append_events([event("u", 12)])
        assert len(list((folder / "events").glob("*.jsonl"))) == len(segments)
        assert [r.body["seq"] for r in big.read("events", after=offsets[-1])] == [12]


def test_offsets_that_are_not_this_streams_are_errors(url):
    with opened(url) as stream:
        offsets = stream.append_events([event("u", 0), event("u", 1)])
        raises(lambda: stream.read("clicks"), "clicks", "events, items", error=StreamError)
        raises(lambda: stream.read("events", after="garbage"), "garbage", error=StreamError)
        if url.startswith("dir:"):
            raises(lambda: stream.read("events", after=f"{int(offsets[0]) - 3:020d}"), "not the end of a record", error=StreamError)
            raises(lambda: stream.read("events", after=f"{int(offsets[1]) + 50:020d}"), "past the end", error=StreamError)
            raises(lambda: stream.read("items", after=offsets[0]), "items", "empty", error=StreamError)


def test_urls_that_cannot_be_opened_are_errors_that_name_them(tmp_path, monkeypatch):
    raises(lambda: open_stream("kafka://broker:9092/events"), "kafka://broker:9092", "redis://", "dir:PATH", error=StreamError)
    (tmp_path / "file").write_text("")
    raises(lambda: open_stream(f"dir:{tmp_path / 'file'}"), str(tmp_path / "file"), error=StreamError)
    pytest.importorskip("redis")
    port = free_port()  # nothing listens there
    message = raises(lambda: open_stream(f"redis://:secret@127.0.0.1:{port}/0"), f"127.0.0.1:{port}", "connect", error=StreamError)
    assert "secret" not in message and ":***@" in message
    message = raises(lambda: open_stream(f"redis://u:secret@127.0.0.1:{port}/0?prefix="), "prefix", "u:***@", error=StreamError)
    assert "secret" not in message
    monkeypatch.delitem(sys.modules, "twotower.streaming.redis_stream", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)
    raises(lambda: open_stream(f"redis://127.0.0.1:{port}/0"), "pip install 'twotower[stream]'", error=StreamError)


def test_redis_keeps_every_returned_append_across_a_kill(tmp_path):
    """With appendonly yes and appendfsync always (docs/stream.md), what an append returned survives
    the server being killed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    pytest.importorskip("redis")
    port = free_port()
    server = start_redis(tmp_path, port)
    try:
        with open_stream(f"redis://127.0.0.1:{port}/0") as stream:
            offsets = stream.append_events([event("u", i) for i in range(50)])
            stream.claim_items([{"item_id": "a"}])
    finally:
        stop_redis(server)
    server = start_redis(tmp_path, port)
    try:
        with open_stream(f"redis://127.0.0.1:{port}/0") as stream:
            assert [r.offset for r in stream.read("events")] == offsets
            assert stream.claim_items([{"item_id": "a"}]) == [False]
    finally:
        stop_redis(server)
