"""What the GPU path depends on, checked on the CPU: DeepSpeed's bf16 (every parameter cast), the
logQ probabilities kept exact whatever the module's dtype, gradient accumulation drawing fresh
negatives per micro-batch (and resuming to the uninterrupted run), and the gradient norm and the
NaN guard under ZeRO, where parameters have no `.grad`."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from helpers import twotower
from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare
from twotower.modules.lit_two_tower import TwoTowerModule, micro_step

TWO_CPU_ZERO2 = ["trainer.strategy=deepspeed", "trainer.zero_stage=2", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.num_threads=1", "trainer.log_every_n_steps=1"]


def test_logq_probabilities_stay_float64_when_the_module_is_cast_to_bf16():
    """DeepSpeed before 0.19 and Lightning's bf16-true cast buffers with the parameters; the
    popularity probabilities that logQ subtracts must stay exact float64 (reference: the counts)."""
    cfg = load_config([], ["model.mode=id"])
    counts = torch.tensor([0, 3, 10, 1_000_003, 7])
    module = TwoTowerModule(cfg, len(counts), counts, torch.zeros(len(counts), dtype=torch.bool)).to(torch.bfloat16)
    expected = (counts.double() + 1) / (counts.sum().double() + len(counts))
    assert module.item_prob.dtype == torch.float64
    assert torch.equal(module.item_prob, expected) and module.item_prob.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_micro_steps_are_distinct_within_and_across_accumulation_windows():
    for accumulate in (1, 2, 3):
        seen = [micro_step(batch // accumulate, batch, accumulate) for batch in range(20)]
        assert seen == list(range(20))


class _Seeds(pl.Callback):
    """The seed each training batch ran with."""

    def __init__(self):
        self.seeds = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seeds.append(torch.initial_seed())


def test_gradient_accumulation_draws_fresh_negatives_for_every_micro_batch(tiny_overrides, tmp_path):
    cfg = load_config([], tiny_overrides + ["model.mode=id", "model.loss.candidates=sampled", "trainer.accumulate_grad_batches=2"])
    prepare(cfg)
    data = ShardDataModule(cfg)
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold, len(data.actions))
    drawn = []
    original = module._sampled_loss

    def recording(inputs, targets, positions):
        state = torch.get_rng_state()
        drawn.append(torch.randint(len(module.eligible), (cfg.model.loss.num_negatives,)))  # what the step will draw
        torch.set_rng_state(state)
        return original(inputs, targets, positions)

    module._sampled_loss = recording
    seeds = _Seeds()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         callbacks=[seeds], limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and len(seeds.seeds) == len(drawn) == 4  # two windows of two micro-batches
    assert len(set(seeds.seeds)) == 4, seeds.seeds  # before: each window's two micro-batches shared one seed
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[2], drawn[3])


def _test_metrics(run) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k.startswith(("test/", "steps"))}


def test_a_run_resumed_under_gradient_accumulation_ends_where_the_uninterrupted_one_does(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith(("trainer.max_epochs", "run.dir"))]
    common += ["model.mode=id", "model.loss.candidates=sampled", "trainer.accumulate_grad_batches=2"]
    whole = twotower("fit", *common, "trainer.max_epochs=2", f"run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = twotower("fit", *common, "trainer.max_epochs=1", f"run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = twotower("fit", *common, "trainer.max_epochs=2", "trainer.resume=auto", f"run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert resumed.returncode == 0 and "Restoring states from the checkpoint path" in resumed.stderr, resumed.stderr[-3000:]
    expected = _test_metrics(tmp_path / "whole")
    assert _test_metrics(tmp_path / "resumed") == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_deepspeed_bf16_with_a_memory_mapped_frozen_cache_trains_and_logs_the_gradient_norm(tiny_overrides, tmp_path):
    """ZeRO-2 with bf16 on two CPU processes, one frozen encoder layer cached on disk: before, hashing
    and writing the cache failed on bf16 weights, and `train/grad_norm` was never logged (no `.grad`)."""
    result = twotower("fit", *tiny_overrides, *TWO_CPU_ZERO2, "trainer.precision=bf16-mixed", "trainer.max_epochs=1",
                      "model.item.train_layers=1", f"model.item.frozen_cache_dir={tmp_path / 'cache'}", cwd=tmp_path, threads=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "cache").glob("frozen-cache-*.npy"))) == 1
    steps = pd.read_csv(tmp_path / "run" / "metrics.csv").dropna(subset=["train/loss"])
    assert len(steps) > 0 and steps["train/loss"].map(lambda v: v == v and abs(v) < float("inf")).all()
    norms = steps["train/grad_norm"]
    assert norms.notna().all() and (norms > 0).all() and (norms < float("inf")).all()


@pytest.mark.slow
def test_zero2_nan_guard_stops_naming_the_step(tiny_overrides, tmp_path):
    diverging = ["model.mode=id", "trainer.lr=1e30", "trainer.gradient_clip_val=0"]
    result = twotower("fit", *tiny_overrides, *TWO_CPU_ZERO2, *diverging, cwd=tmp_path, threads=1)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite loss or gradients at step" in result.stderr and "last good checkpoint" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
