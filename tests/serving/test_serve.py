"""`twotower serve` as a real server process on a loopback port: recommendations round-trip,
bad requests get a 4xx with a message (never a 5xx), new items are searchable as soon as the POST
returns and are found for histories like them, and recommending while items are added never fails."""
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from twotower.configs import load_config
from twotower.configs.serving import ServingConfig
from twotower.datamodules.synthetic import catalogue
from twotower.modules.two_tower import TwoTower
from twotower.serving.app import build_app
from twotower.serving.export_format import Exported, load_exported
from twotower.serving.item_index import build_index
from twotower.serving.recommender import Recommender

from exported_run import exported_run
from helpers import free_port

LIMITS = ServingConfig()


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: uvicorn finishes in-flight requests and exits
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server ignored SIGTERM:\n{self.log.read_text()[-3000:]}")


def start_server(model: Path, log: Path, timeout: float = 300, overrides: Sequence[str] = ()) -> Server:
    """`twotower serve --model MODEL [key=value ...]` on a free port, once it answers /health."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "twotower", "serve", "--model", str(model), "--port", url.rsplit(":", 1)[1],
                                    *overrides], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(process, url, log)
        except httpx.TransportError:
            time.sleep(0.3)
    Server(process, url, log).stop()
    raise AssertionError(f"no /health within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def run(tiny_overrides, tmp_path_factory):
    return exported_run(tiny_overrides, tmp_path_factory)


@pytest.fixture(scope="module")
def servers():
    """Servers started by this module's tests, by model folder: one process serves them all."""
    started: dict[Path, Server] = {}
    yield started
    for server in started.values():
        server.stop()  # uvicorn re-raises the SIGTERM it handled, so the exit status is -SIGTERM
        assert "Application shutdown complete" in server.log.read_text(), server.log.read_text()[-3000:]


@pytest.fixture
def server(run, servers, tmp_path_factory) -> Server:
    if run.model not in servers:
        servers[run.model] = start_server(run.model, tmp_path_factory.mktemp("server") / "server.log")
    return servers[run.model]


@pytest.fixture
def item_ids(run) -> list[str]:
    return json.loads((run.model / "item_ids.json").read_text())


def exported_only(rows: list[dict], known: set[str]) -> list[dict]:
    """Results restricted to the exported catalogue (other tests may have added items)."""
    return [r for r in rows if r["item_id"] in known]


@pytest.mark.slow
def test_recommend_round_trip(server, run, item_ids):
    histories = [item_ids[:5], item_ids[30:32], [item_ids[9]]]
    reference = Recommender(load_exported(run.model)).recommend(histories, 10, exclude=[item_ids[50]])
    response = httpx.post(f"{server.url}/recommend", json={"histories": histories, "k": LIMITS.max_k, "exclude": [item_ids[50]]})
    assert response.status_code == 200, response.text
    for got, expected in zip(response.json()["results"], reference):
        got = exported_only(got["items"], set(item_ids))[:10]
        assert [r["item_id"] for r in got] == [i for i, _ in expected]
        np.testing.assert_allclose([r["score"] for r in got], [s for _, s in expected], rtol=1e-5, atol=1e-5)
    single = httpx.post(f"{server.url}/recommend", json={"history": histories[0], "k": LIMITS.max_k})
    assert single.status_code == 200 and set(single.json()) == {"items"}
    assert not {r["item_id"] for r in single.json()["items"]} & set(histories[0])


BAD_REQUESTS = [
    ("/recommend", b'{"history": ["a", ', "JSON decode error"),
    ("/recommend", b"[1, 2]", "valid dictionary"),
    ("/recommend", {"history": ["{0}"], "k": 0}, "greater than or equal to 1"),
    ("/recommend", {"history": ["{0}"], "k": 10**6}, "less than or equal to"),
    ("/recommend", {"history": ["{0}"], "k": "ten"}, "valid integer"),
    ("/recommend", {"history": ["{0}", "no-such-item"]}, "no-such-item"),
    ("/recommend", {"history": ["{0}"], "exclude": ["missing-too"]}, "missing-too"),
    ("/recommend", {"history": []}, "at least 1 item"),
    ("/recommend", {"histories": [["{0}"]] * (LIMITS.max_batch + 1)}, f"at most {LIMITS.max_batch} items"),
    ("/recommend", {"history": ["{0}"] * (LIMITS.max_history + 1)}, f"at most {LIMITS.max_history} items"),
    ("/recommend", {"k": 5}, "exactly one of"),
    ("/recommend", {"history": ["{0}"], "histories": [["{0}"]]}, "exactly one of"),
    ("/recommend", {"history": ["{0}"], "kk": 5}, "Extra inputs"),
    ("/items", {"items": []}, "at least 1 item"),
    ("/items", {"items": [{"item_id": "{0}", "title": "again"}]}, "already in the catalogue"),
    ("/items", {"items": [{"item_id": "fresh-1", "titel": "typo"}]}, "unknown field 'titel'"),
    ("/items", {"items": [{"item_id": "fresh-2", "title": ""}]}, "no text"),
    ("/items", {"items": [{"item_id": "fresh-3", "title": {"nested": 1}}]}, "valid string"),
    ("/items", {"items": [{"title": "no id"}]}, "item_id"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,body,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(server, item_ids, path, body, message):
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{server.url}{path}", content=json.dumps(body).replace("{0}", item_ids[0]),
                              headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert message in json.dumps(response.json()["detail"])


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send `request` as is on a fresh connection; the response head and what came with it.
    Times out (failing the test) if the server waits for more than was sent."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    return received


@pytest.mark.slow
def test_bodies_over_the_limit_get_413_before_they_are_read(server, item_ids):
    """serving.max_body_bytes is checked before parsing: a declared length over it is refused at once,
    and a chunked body as soon as it passes the limit, without waiting for (or keeping) the rest."""
    limit = LIMITS.max_body_bytes
    at_limit = json.dumps({"history": [item_ids[0]], "k": 10}).ljust(limit).encode()  # trailing spaces: still valid JSON
    over = json.dumps({"history": [item_ids[0]] * (limit // len(item_ids[0]))}).encode()
    assert len(at_limit) == limit < len(over)
    headers = {"content-type": "application/json"}
    assert httpx.post(f"{server.url}/recommend", content=at_limit, headers=headers).status_code == 200

    for path, content in [("/recommend", over), ("/items", over),  # with Content-Length, then chunked:
                          ("/recommend", iter([over[i:i + 65536] for i in range(0, len(over), 65536)]))]:
        response = httpx.post(f"{server.url}{path}", content=content, headers=headers)
        assert response.status_code == 413, response.text
        assert f"the limit is {limit} bytes (serving.max_body_bytes)" in response.json()["detail"]

    head = b"POST /recommend HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    declared = raw_exchange(server.url, head + b"content-length: 1000000000\r\n\r\n" + b"[" * 1000)
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    chunk = b" " * (limit + 1)  # one chunk past the limit, and no final 0-length chunk
    chunked = raw_exchange(server.url, head + b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow
def test_new_items_are_found_at_once_for_histories_like_them(server, run):
    """For each topic of the built-in data: a history of five of its items, and two new items, one
    repeating the text of the history's newest item, one the text of an item of another topic. The
    first must rank in the top half of the catalogue and, for most topics, above the second."""
    cfg = load_config([run.model / "config.yaml"]).data.synthetic
    items = catalogue(cfg)
    topics = range(cfg.num_topics)
    histories, new = [], []
    for t in topics:
        history = items[items["topic"] == t].head(5)
        other = items[items["topic"] == (t + cfg.num_topics // 2) % cfg.num_topics].iloc[0]
        histories.append(history["item_id"].tolist())
        new += [{"item_id": f"on-topic-{t}", "title": history["title"].iloc[-1], "text": history["text"].iloc[-1]},
                {"item_id": f"off-topic-{t}", "title": other["title"], "text": other["text"]}]
    before = httpx.get(f"{server.url}/health").json()["items"]
    added = httpx.post(f"{server.url}/items", json={"items": new})
    assert added.status_code == 200, added.text
    health = httpx.get(f"{server.url}/health").json()
    assert added.json()["items"] == health["items"] == before + len(new) and health["mode"] == "id+text"

    response = httpx.post(f"{server.url}/recommend", json={"histories": histories, "k": LIMITS.max_k})
    assert response.status_code == 200, response.text
    on_top_half, on_above_off = [], []
    for t, result in zip(topics, response.json()["results"]):
        ranked = [r["item_id"] for r in result["items"]]
        on, off = ranked.index(f"on-topic-{t}"), ranked.index(f"off-topic-{t}")
        on_top_half.append(on < len(ranked) / 2)
        on_above_off.append(on < off)
    assert all(on_top_half), on_top_half
    assert sum(on_above_off) >= 0.75 * len(on_above_off), on_above_off


@pytest.mark.slow
def test_recommending_while_items_are_added_never_fails(server, item_ids):
    statuses, errors = [], []

    def recommend_many(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(25):
                history = rng.choice(item_ids, size=4, replace=False).tolist()
                try:
                    response = client.post("/recommend", json={"history": history, "k": 10})
                    statuses.append(response.status_code)
                    assert len(response.json()["items"]) == 10
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(repr(exc))

    before = httpx.get(f"{server.url}/health").json()["items"]
    threads = [threading.Thread(target=recommend_many, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for n in range(20):
            response = client.post("/items", json={"items": [{"item_id": f"live-{n}", "title": f"live item {n}", "text": "galaxy"}]})
            assert response.status_code == 200, response.text
    for thread in threads:
        thread.join()
    assert not errors and statuses == [200] * 150, (errors, set(statuses))
    assert httpx.get(f"{server.url}/health").json()["items"] == before + 20
    found = httpx.post(f"{server.url}/recommend", json={"history": ["live-0"], "k": LIMITS.max_k}).json()["items"]
    assert {f"live-{n}" for n in range(1, 20)} <= {r["item_id"] for r in found}


def test_id_mode_serves_but_refuses_new_items():
    cfg = load_config([], ["model.mode=id", "model.dim=8", "data.max_len=4"])
    torch.manual_seed(0)
    model = TwoTower(cfg.model, 4).eval()
    vectors = model.catalogue_vectors(4)
    exported = Exported(cfg=cfg, model=model, item_ids=["a", "b", "c", "d"], texts=["", "", "", ""], vectors=vectors,
                        index=build_index(vectors.numpy(), LIMITS), tokenizer=None)
    client = TestClient(build_app(Recommender(exported), LIMITS))
    assert client.get("/health").json() == {"status": "ok", "items": 4, "mode": "id", "index": "IndexFlatIP", "export_id": "", "swaps": 0,
                                           "stream": None, "items_offset": None}
    ranked = client.post("/recommend", json={"history": ["a", "b"], "k": 5}).json()["items"]
    assert sorted(r["item_id"] for r in ranked) == ["c", "d"]
    refused = client.post("/items", json={"items": [{"item_id": "e", "title": "new"}]})
    assert refused.status_code == 422 and "model.mode=id" in refused.json()["detail"]


def test_a_model_with_time_and_action_features_reads_them_from_each_history_item():
    cfg = load_config([], ["model.mode=id", "model.dim=8", "data.max_len=4", "model.user.time_gaps=true", "model.user.actions=true"])
    torch.manual_seed(0)
    model = TwoTower(cfg.model, 6, num_actions=2).eval()
    vectors = model.catalogue_vectors(6)
    exported = Exported(cfg=cfg, model=model, item_ids=list("abcdef"), texts=[""] * 6, vectors=vectors,
                        index=build_index(vectors.numpy(), LIMITS), tokenizer=None, actions=["1", "5"])
    client = TestClient(build_app(Recommender(exported), LIMITS))
    history = [{"item_id": "a", "timestamp": 100, "action": "5"}, {"item_id": "c", "timestamp": 100, "action": "1"},
               {"item_id": "b", "timestamp": 3700, "action": 5}]
    ranked = client.post("/recommend", json={"history": history, "k": 3}).json()["items"]
    # Reference: the tower on hand-coded features: gaps 0 (first), 1 (same second), 1 + floor(log2 3601) = 12.
    with torch.no_grad():
        user = model.user_tower(vectors[[0, 2, 1]][None], torch.ones(1, 3, dtype=torch.bool),
                                torch.tensor([[0, 1, 12]]), torch.tensor([[2, 1, 2]]))[0, -1]
    scores = (vectors @ user).tolist()
    expected = sorted((i for i in range(6) if i not in (0, 1, 2)), key=lambda i: -scores[i])
    assert [r["item_id"] for r in ranked] == ["abcdef"[i] for i in expected]
    assert [r["score"] for r in ranked] == pytest.approx([scores[i] for i in expected], rel=1e-5)

    for body, words in ((["a", "c"], "reads each item's timestamp (model.user.time_gaps=true)"),
                        ([{"item_id": "a", "timestamp": 1, "action": "5"}, {"item_id": "c", "action": "5"}], "give every item its timestamp, or none"),
                        ([{"item_id": "a", "timestamp": 1, "action": "3"}], "unknown action(s) '3'; the model knows '1', '5'"),
                        ([{"item_id": "a", "timestamp": 9, "action": "5"}, {"item_id": "c", "timestamp": 1, "action": "5"}], "oldest first")):
        refused = client.post("/recommend", json={"history": body, "k": 3})
        assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
