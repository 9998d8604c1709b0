"""`twotower serve` with an event stream (`stream.url`): real server processes, two of them on one
stream, on the embedded folder backend and on a real redis-server. What a server accepts is in the
stream when it answers, and nothing else is: events in order, each new item id claimed once (two
servers racing for it: one 200, one 409), and both servers end up serving every item; a restarted
server serves the items added live at once, skipping records that are not items. The smaller
cases (no stream, an id-mode model, a stream that fails to read) run in-process."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from test_serve import Server, start_server

from twotower.cli import main
from twotower.configs import load_config
from twotower.configs.serving import ServingConfig
from twotower.modules.two_tower import TwoTower
from twotower.serving.app import build_app
from twotower.serving.export_format import Exported, load_exported
from twotower.serving.item_index import build_index
from twotower.serving.recommender import Recommender
from twotower.serving.stream_items import item_records
from twotower.streaming import Record, Stream, open_stream

from conftest import tiny
from exported_run import exported_run
from helpers import free_port

LIMITS = ServingConfig()
BACKENDS = ["dir", "redis"]
POLL_S = 0.2
"The servers' stream.poll_interval_s."


def new_stream_url(backend: str, request: pytest.FixtureRequest, folder: Path) -> str:
    """A fresh, empty stream: a folder, or a prefix of its own in the Redis database."""
    if backend == "dir":
        return str(folder / "stream")
    return f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex[:8]}"


def everything(stream: Stream, log: str) -> list[Record]:
    records, page = [], stream.read(log)
    while page:
        records += page
        page = stream.read(log, page[-1].offset)
    return records


@dataclass
class Replicas:
    """Two servers of one export on one stream."""

    backend: str
    url: str
    model: Path
    folder: Path
    servers: list[Server]
    item_ids: list[str]

    def start(self, name: str) -> Server:
        return start_server(self.model, self.folder / f"{name}.log", overrides=[f"stream.url={self.url}", f"stream.poll_interval_s={POLL_S}"])

    def stream(self) -> Stream:
        return open_stream(self.url)

    def converged(self, timeout: float = 30) -> list[dict]:
        """Each server's /health once all of them have read the whole items log."""
        with self.stream() as stream:
            last = stream.last_offset("items")
        deadline = time.monotonic() + timeout
        while True:
            health = [httpx.get(f"{s.url}/health").json() for s in self.servers]
            if all(h["items_offset"] == last for h in health):
                return health
            assert time.monotonic() < deadline, f"not caught up to {last} in {timeout} s: {health}"
            time.sleep(POLL_S / 2)


@pytest.fixture(scope="module")
def model(tiny_bert, tmp_path_factory) -> Path:
    """The serving tests' exported model (trained once per session)."""
    return exported_run(tiny(tiny_bert, tmp_path_factory.mktemp("run")), tmp_path_factory).model


@pytest.fixture(scope="module", params=BACKENDS)
def replicas(request, model, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"replicas-{request.param}")
    url = new_stream_url(request.param, request, folder)
    replicas = Replicas(request.param, url, model, folder, [], json.loads((model / "item_ids.json").read_text()))
    with ThreadPoolExecutor(2) as pool:  # started side by side: each start mostly waits on its process
        replicas.servers += pool.map(replicas.start, ["a", "b"])
    yield replicas
    for server in replicas.servers:
        server.stop()


@pytest.mark.slow
def test_events_land_in_the_stream_in_order(replicas):
    items, user = replicas.item_ids, f"order-{replicas.backend}"
    batches = [[{"user_id": user, "item_id": items[n], "timestamp": 1000.0 + n, "event": "view"} for n in range(3)],
               [{"user_id": user, "item_id": items[3]}],  # no timestamp: the server's time
               [{"user_id": user, "item_id": items[n], "timestamp": 2000.5 + n} for n in range(4, 8)]]
    answers = []
    for n, batch in enumerate(batches):
        before = time.time()
        response = httpx.post(f"{replicas.servers[n % 2].url}/events", json={"events": batch})
        assert response.status_code == 200, response.text
        assert response.json()["appended"] == len(batch) == len(response.json()["offsets"])
        answers += response.json()["offsets"]
        if n == 1:
            batch[0]["timestamp"] = pytest.approx((before + time.time()) / 2, abs=(time.time() - before) / 2 + 1e-3)
    with replicas.stream() as stream:
        records = [r for r in everything(stream, "events") if r.body.get("user_id") == user]
    assert [r.body for r in records] == [e for batch in batches for e in batch]
    assert [r.offset for r in records] == answers


@pytest.mark.slow
def test_racing_servers_add_each_new_item_once_and_both_serve_it(replicas):
    ids = [f"race-{replicas.backend}-{n}" for n in range(8)]
    answers: dict[str, list[tuple[int, str]]] = {i: [] for i in ids}
    start = threading.Barrier(2, timeout=60)

    def fire(server: Server) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for item_id in ids:
                start.wait()
                response = client.post("/items", json={"items": [{"item_id": item_id, "title": f"comet {item_id}", "text": "orbit"}]})
                answers[item_id].append((response.status_code, response.text))

    threads = [threading.Thread(target=fire, args=(server,)) for server in replicas.servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(sorted(status for status, _ in a) == [200, 409] for a in answers.values()), answers
    with replicas.stream() as stream:
        claimed = Counter(r.body.get("item_id") for r in everything(stream, "items"))
    assert all(claimed[i] == 1 for i in ids), claimed

    health = replicas.converged()
    assert len({h["items"] for h in health}) == 1, health
    for server in replicas.servers:
        response = httpx.post(f"{server.url}/recommend", json={"history": ids, "k": 5})
        assert response.status_code == 200, response.text  # every id known to both


@pytest.mark.slow
def test_under_concurrent_load_every_accepted_write_is_in_the_stream_and_nothing_else(replicas):
    """8 clients x 50 requests at both servers: events (a tenth of them in requests that name an
    unknown item, refused whole), and new items from a pool every client races for."""
    tag, items = f"load-{replicas.backend}", replicas.item_ids
    accepted_events: dict[int, list[dict]] = {t: [] for t in range(8)}
    item_answers: list[tuple[str, int]] = []
    statuses: list[int] = []
    errors: list[str] = []

    def client_thread(t: int) -> None:
        clients = [httpx.Client(base_url=s.url, timeout=60) for s in replicas.servers]
        try:
            send(t, clients)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        for client in clients:
            client.close()

    def send(t: int, clients: list[httpx.Client]) -> None:
        for n in range(50):
            client = clients[(t + n) % 2]
            if n % 10 == 7:
                item_id = f"{tag}-item-{n // 10}"
                response = client.post("/items", json={"items": [{"item_id": item_id, "title": f"pulsar {n}"}]})
                item_answers.append((item_id, response.status_code))
            else:
                events = [{"user_id": f"{tag}-{t}", "item_id": items[(t * 50 + n + j) % len(items)], "timestamp": t * 1e4 + n + j / 10}
                          for j in range(1 + n % 3)]
                if n % 10 == 8:
                    events.append({"user_id": f"{tag}-{t}", "item_id": f"{tag}-no-such-item", "timestamp": 0.0})
                response = client.post("/events", json={"events": events})
                if response.status_code == 200:
                    accepted_events[t] += events
            statuses.append(response.status_code)

    threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(statuses) == 400 and set(statuses) <= {200, 409, 422}, (errors, Counter(statuses))

    with replicas.stream() as stream:
        events = [r.body for r in everything(stream, "events") if str(r.body.get("user_id")).startswith(tag)]
        new_items = [r.body["item_id"] for r in everything(stream, "items") if str(r.body.get("item_id")).startswith(tag)]
    for t in range(8):  # each client's accepted events, in the order it sent them, and no other
        assert [e for e in events if e["user_id"] == f"{tag}-{t}"] == accepted_events[t]
    assert len(events) == sum(map(len, accepted_events.values()))
    won = [item_id for item_id, status in item_answers if status == 200]
    assert sorted(new_items) == sorted(won) == sorted({item_id for item_id, _ in item_answers}), item_answers
    assert all(status in (200, 409) for _, status in item_answers), item_answers


def append_raw(url: str, line: bytes) -> None:
    """Write `line` to the items log as a hand edit or a foreign writer would, bypassing the backend."""
    if "://" in url:
        plain, _, prefix = url.partition("?prefix=")
        with redis.Redis.from_url(plain) as client:
            client.xadd(f"{prefix}:items", {"body": line})
    else:
        segment = max((Path(url) / "items").glob("*.jsonl"))
        with open(segment, "ab") as f:
            f.write(line + b"\n")


@pytest.mark.slow
def test_a_restarted_server_serves_the_items_added_live_at_once(replicas):
    item_id = f"restart-{replicas.backend}"
    added = httpx.post(f"{replicas.servers[1].url}/items", json={"items": [{"item_id": item_id, "title": "nebula", "text": "restart"}]})
    assert added.status_code == 200, added.text
    replicas.servers.pop().stop()
    with replicas.stream() as stream:  # records that are not items: skipped and logged, never a crash
        assert stream.claim_items([{"item_id": f"{item_id}-no-text"}]) == [True]
    append_raw(replicas.url, b'{"title": "no item_id"}')
    append_raw(replicas.url, b"{not json")

    replicas.servers.append(replicas.start("b-restarted"))
    server = replicas.servers[-1]
    response = httpx.post(f"{server.url}/recommend", json={"history": [item_id], "k": 5})
    assert response.status_code == 200, response.text
    health = replicas.converged()
    assert health[0]["items"] == health[1]["items"] and health[1]["stream"] is not None, health
    log = server.log.read_text()
    assert f"item '{item_id}-no-text'" in log and "has no text" in log and log.count("is not an item") == 2, log[-3000:]
    assert "Traceback" not in replicas.servers[0].log.read_text()  # the other server's follower skipped them too


BAD_BODIES = [
    ("/events", {"events": []}, "at least 1 item"),
    ("/events", {"events": [{"user_id": "bad-user", "item_id": "{0}"}, {"user_id": "bad-user", "item_id": "bad-item"}]}, "'bad-item'"),
    ("/events", {"events": [{"item_id": "{0}"}]}, "user_id"),
    ("/events", {"events": [{"user_id": "bad-user", "item_id": "{0}", "action": "click"}]}, "Extra inputs"),
    ("/events", {"events": [{"user_id": "bad-user", "item_id": "{0}", "timestamp": "soon"}]}, "valid number"),
    ("/events", '{"events": [{"user_id": "bad-user", "item_id": "{0}", "timestamp": 1e400}]}', "finite number"),
    ("/events", {"events": [{"user_id": "bad-user", "item_id": "{0}"}] * (LIMITS.max_events + 1)}, f"at most {LIMITS.max_events} items"),
    ("/items", {"items": [{"item_id": "bad-1", "titel": "typo"}]}, "unknown field 'titel'"),
    ("/items", {"items": [{"item_id": "bad-2", "title": " "}]}, "no text"),
    ("/items", {"items": [{"item_id": "{0}", "title": "again"}]}, "already in the catalogue"),
]


@pytest.mark.slow
def test_bad_bodies_get_a_4xx_naming_the_problem_and_write_nothing(replicas):
    server = replicas.servers[0]
    for path, body, message in BAD_BODIES:
        text = (body if isinstance(body, str) else json.dumps(body)).replace("{0}", replicas.item_ids[0])
        response = httpx.post(f"{server.url}{path}", content=text, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500 and message in json.dumps(response.json()["detail"]), (path, body, response.text)
    with replicas.stream() as stream:
        assert not [r for r in everything(stream, "events") if r.body.get("user_id") == "bad-user"]
        assert not [r for r in everything(stream, "items") if str(r.body.get("item_id")).startswith("bad-")]


@pytest.mark.slow
def test_a_swap_carries_over_the_items_read_from_the_stream(model, tmp_path):
    """They count as added live: a new export that lacks them gets them, re-embedded; one it has
    (the export's own item, claimed in the stream too) is not added twice."""
    item_ids = json.loads((model / "item_ids.json").read_text())
    stream = open_stream(str(tmp_path / "stream"))
    assert stream.claim_items([{"item_id": "streamed", "title": "quasar"}, {"item_id": item_ids[0], "title": "again"}]) == [True, True]
    recommender = Recommender(load_exported(model))
    with TestClient(build_app(recommender, LIMITS, stream=stream)) as client:
        assert client.get("/health").json()["items"] == len(item_ids) + 1
        assert recommender.swap(load_exported(model)) == 1
        assert client.get("/health").json()["items"] == len(item_ids) + 1
        assert client.post("/recommend", json={"history": ["streamed"], "k": 3}).status_code == 200


def test_a_stream_that_cannot_be_opened_stops_serve_with_a_message(capsys):
    old_export = Path(__file__).resolve().parents[1] / "data" / "v0.1.0" / "export"
    assert main(["serve", "--model", str(old_export), f"stream.url=redis://127.0.0.1:{free_port()}/0"]) == 1
    assert "twotower serve: stream error: Redis stream redis://127.0.0.1:" in capsys.readouterr().err


def id_mode_export() -> Exported:
    """A 4-item id-mode model (no text tower), built in-process."""
    cfg = load_config([], ["model.mode=id", "model.dim=8", "data.max_len=4"])
    torch.manual_seed(0)
    model = TwoTower(cfg.model, 4).eval()
    vectors = model.catalogue_vectors(4)
    return Exported(cfg=cfg, model=model, item_ids=["a", "b", "c", "d"], texts=[""] * 4, vectors=vectors,
                    index=build_index(vectors.numpy(), LIMITS), tokenizer=None)


def test_events_need_a_stream():
    client = TestClient(build_app(Recommender(id_mode_export()), LIMITS))
    refused = client.post("/events", json={"events": [{"user_id": "u", "item_id": "a"}]})
    assert refused.status_code == 409 and "start it with stream.url=" in refused.json()["detail"], refused.text


def test_an_id_mode_server_skips_the_streams_items_and_claims_none(tmp_path, caplog):
    stream = open_stream(str(tmp_path / "stream"))
    assert stream.claim_items([{"item_id": "e", "title": "new"}, {"item_id": "a", "title": "old"}]) == [True, True]
    with caplog.at_level(logging.INFO, "twotower.serve"), \
            TestClient(build_app(Recommender(id_mode_export()), LIMITS, stream=stream, poll_interval_s=POLL_S)) as client:
        health = client.get("/health").json()
        assert health["items"] == 4 and health["items_offset"] == stream.last_offset("items") and health["stream"] == stream.url
        assert "model.mode=id: 2 item(s) of the stream's items log skipped" in caplog.text
        refused = client.post("/items", json={"items": [{"item_id": "f", "title": "new"}]})
        assert refused.status_code == 422 and "model.mode=id" in refused.json()["detail"]
        assert [r.body["item_id"] for r in stream.read("items")] == ["e", "a"]  # nothing claimed
        appended = client.post("/events", json={"events": [{"user_id": "u", "item_id": "a", "timestamp": 5, "event": "buy"}]})
        assert appended.status_code == 200, appended.text
        assert [r.body for r in stream.read("events")] == [{"user_id": "u", "item_id": "a", "timestamp": 5.0, "event": "buy"}]
        assert appended.json() == {"appended": 1, "offsets": [stream.last_offset("events")]}


def test_the_item_follower_survives_a_stream_that_fails_and_resumes(tmp_path, caplog):
    stream = open_stream(str(tmp_path / "stream"))
    with caplog.at_level(logging.INFO, "twotower.serve"), \
            TestClient(build_app(Recommender(id_mode_export()), LIMITS, stream=stream, poll_interval_s=0.05)) as client:
        assert client.get("/health").json()["items_offset"] is None
        (tmp_path / "stream" / "items").rename(tmp_path / "away")  # reads fail: the folder is gone
        time.sleep(0.3)
        assert "following the items log" in caplog.text and "retrying" in caplog.text
        (tmp_path / "away").rename(tmp_path / "stream" / "items")
        stream.claim_items([{"item_id": "e", "title": "new"}])
        deadline = time.monotonic() + 10
        while client.get("/health").json()["items_offset"] != stream.last_offset("items"):
            assert time.monotonic() < deadline, "the follower did not resume"
            time.sleep(0.05)


def test_records_that_are_not_items_are_skipped_and_logged(caplog):
    records = [Record("1", {"_malformed": "{not json"}), Record("2", {"title": "no id"}), Record("3", {"item_id": "x", "text": ""}),
               Record("4", {"item_id": 7, "title": "Comet", "genre": "extra fields are ignored"})]
    with caplog.at_level(logging.WARNING, "twotower.serve"):
        assert item_records(records, ["title", "text"]) == [{"item_id": "7", "title": "Comet"}]
    assert caplog.text.count("is not an item") == 2 and "item 'x' (record 3) has no text in any of title, text" in caplog.text
