"""Shared fixtures: a tiny random BERT (with the packaged MiniLM's tokenizer) for fast tests,
and small configs that run end to end in seconds on a 2-core CPU. Helpers that are not fixtures
are in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import REDIS_SERVER, free_port, save_tiny_bert, start_redis, stop_redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# Under pytest-xdist the cores are shared by the workers: each worker, and every process it starts
# (OMP_NUM_THREADS is inherited), gets its share instead of all of them.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(min(2, THREADS))

@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT saved as a local folder, with MiniLM's real tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny(tiny_bert: str, folder: Path) -> list[str]:
    """key=value overrides for a seconds-long end-to-end run on small synthetic data in `folder`."""
    return [
        f"model.item.encoder={tiny_bert}", "model.item.train_layers=-1", "model.dim=32",
        "data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.synthetic.mean_events=15",
        "data.max_text_len=16", "data.max_len=20", "data.batch_size=64", "data.shuffle_buffer=50",
        "trainer.max_epochs=2", "trainer.warmup_steps=2", "model.loss.num_negatives=32",
        f"data.dir={folder / 'data'}", f"run.dir={folder / 'run'}",
    ]


@pytest.fixture
def tiny_overrides(tiny_bert, tmp_path) -> list[str]:
    return tiny(tiny_bert, tmp_path)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    """redis://127.0.0.1:PORT/0 of a real redis-server shared by a test module (each test takes a
    key prefix of its own: ?prefix=...); skips where redis-server or redis-py is missing."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it): the Redis backend is not tested")
    pytest.importorskip("redis", reason="redis-py is missing: pip install 'twotower[stream]'")
    port = free_port()
    server = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(server)
