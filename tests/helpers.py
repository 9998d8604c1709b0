"""What several test files share: the real command line in a subprocess, a free port, an error
check, the tiny random BERT (also used by bench/serve.py), and a real redis-server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"The public data sets beside the repository (../shared/data), which it may not redistribute; tests that read them skip where they are missing."


def twotower(*args: str, cwd: Path, timeout: float = 600, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m twotower ARGS` in `cwd`, as a user would run it; `threads` caps each process's
    OpenMP threads (several ranks on 2 cores would otherwise oversubscribe them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "twotower", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def printed_metrics(stdout: str, label: str) -> dict[str, float]:
    """The row `label` of the metrics table the command line prints: {"hr@10": ..., ...} (4 decimals)."""
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| ") and "NDCG@10" in line)
    row = next(line for line in lines if line.startswith(f"| {label}"))
    names = [cell.strip().lower() for cell in header.split("|")[2:-1]]
    return dict(zip(names, (float(cell) for cell in row.split("|")[2:-1])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raises(call, *words: str, error: type[Exception] | None = None) -> str:
    """Run `call`, expect an `error` (default: the readers' DataError) whose message holds every one
    of `words`; return the message."""
    import pytest

    if error is None:
        from twotower.datamodules.readers import DataError as error
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def save_tiny_bert(folder: Path) -> str:
    """A 2-layer, 32-wide random BERT with the packaged MiniLM's real tokenizer, saved to `folder`
    (once: an existing one is reused); returns the folder, a `model.item.encoder` value."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from twotower.modules.item_tower import resolve_encoder

    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_encoder("minilm"))
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def sbatch_job(folder: Path, record: str, setup: str = "") -> tuple[Path, Path, Path]:
    """(script, python, ranks) for a live `sbatch` test: launch/slurm.sbatch less its GPU and CPU
    requests (a CPU test node), and a $PYTHON for its tasks that writes `record` (shell words, e.g.
    "$SLURM_PROCID $SLURM_LOCALID") to ranks/$SLURM_PROCID, runs `setup`, then this interpreter."""
    script, python, ranks = folder / "job.sbatch", folder / "python", folder / "ranks"
    text = (Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch").read_text()
    script.write_text("\n".join(line for line in text.splitlines() if "--gpus-per-node" not in line and "--cpus-per-task" not in line) + "\n")
    ranks.mkdir()
    python.write_text(f'#!/usr/bin/env bash\necho "{record}" > "{ranks}/$SLURM_PROCID"\n{setup}exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return script, python, ranks



REDIS_SERVER = shutil.which("redis-server")


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(folder: Path, port: int) -> subprocess.Popen:
    """A real redis-server on 127.0.0.1:`port`, durable as the Redis backend asks (append-only file
    in `folder`, fsync on every write), once it answers PING."""
    with open(folder / "redis.log", "ab") as log:
        server = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                                   "--appendfsync", "always", "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not answers_ping(port):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"redis-server did not start:\n{(folder / 'redis.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return server


def stop_redis(server: subprocess.Popen) -> None:
    server.kill()
    server.wait()
