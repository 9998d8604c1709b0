"""A running `twotower serve` follows its export folder: a new export written there (as
`twotower update --export` does) is swapped in while a stream of requests runs, and not one
request fails; items added live before the swap are still served after it."""
from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter

import httpx
import pytest
from omegaconf import OmegaConf
from test_serve import start_server

from exported_run import exported_run
from helpers import twotower


@pytest.mark.slow
def test_swapping_the_export_under_a_request_stream_drops_nothing(tiny_overrides, tmp_path_factory, tmp_path):
    run = exported_run(tiny_overrides, tmp_path_factory)
    served = tmp_path / "served"
    shutil.copytree(run.model, served)
    config = OmegaConf.load(served / "config.yaml")
    config.serving.reload_interval_s = 0.2
    OmegaConf.save(config, served / "config.yaml")
    first_id = json.loads((served / "export.json").read_text())["export_id"]
    item_ids = json.loads((served / "item_ids.json").read_text())

    server = start_server(served, tmp_path / "server.log")
    try:
        added = httpx.post(f"{server.url}/items", json={"items": [{"item_id": "live-1", "title": item_ids[0], "text": "added live"}]})
        assert added.status_code == 200, added.text

        outcomes: Counter = Counter()
        stop = threading.Event()

        def stream(offset: int) -> None:
            with httpx.Client(timeout=30) as client:
                n = offset
                while not stop.is_set():
                    n += 1
                    history = [item_ids[n % len(item_ids)], "live-1"]
                    try:
                        response = client.post(f"{server.url}/recommend", json={"history": history, "k": 10})
                        outcomes[response.status_code] += 1
                    except httpx.HTTPError as exc:
                        outcomes[type(exc).__name__] += 1

        threads = [threading.Thread(target=stream, args=(i * 1000,)) for i in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        before_swap = sum(outcomes.values())
        export = twotower("export", "--checkpoint", str(run.checkpoint), "--out", str(served), cwd=tmp_path)
        assert export.returncode == 0, export.stderr[-3000:]
        second_id = json.loads((served / "export.json").read_text())["export_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/health").json()["export_id"] != second_id and time.monotonic() < deadline:
            time.sleep(0.1)
        swapped_at = sum(outcomes.values())
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join()

        health = httpx.get(f"{server.url}/health").json()
        assert second_id != first_id and health["export_id"] == second_id and health["swaps"] == 1, server.log.read_text()[-3000:]
        assert health["items"] == len(item_ids) + 1  # live-1 carried over, re-embedded by the new model
        assert set(outcomes) == {200}, outcomes  # no error, no 4xx, no 5xx, no dropped connection
        assert before_swap > 0 and sum(outcomes.values()) > swapped_at  # requests ran before, during and after
    finally:
        server.stop()
