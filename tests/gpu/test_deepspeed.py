"""DeepSpeed on the GPUs through the command line (Lightning's own DeepSpeedStrategy, not the CPU
subclass): ZeRO-2 with bf16-mixed, and ZeRO-3 with optimizer and parameter offload (the shipped
`trainer/deepspeed_zero3_offload` config: bf16-mixed, DeepSpeedCPUAdam JIT-built on first use).

Each trains one epoch (finite losses, a ZeRO checkpoint folder that consolidates into a plain fp32
state dict which loads into the module), resumes for a second epoch from `last.ckpt`
(`trainer.resume=auto`), then `twotower evaluate` and `twotower export` of the best checkpoint run
on the GPU and give the run's own test metrics.

Precisions, and so the tolerances: under DeepSpeed with bf16 Lightning casts the model itself to
bf16 ("Model parameters and inputs will be cast to bfloat16"), so the metrics in summary.json come
from bf16 weights, while the consolidated checkpoint holds the fp32 master weights that evaluate
and export read. Ranking is float32 in every case (`modules.metrics`), but the vectors it ranks
differ by bf16 rounding, which can swap near-tied items: summary.json is matched within
`BF16_WEIGHTS`. Evaluated in float32 (`trainer.precision=32-true`), evaluate and the export, both
from the same fp32 weights on the GPU, agree within `SAME_WEIGHTS`.
"""
from __future__ import annotations

import pytest
import torch

from helpers import printed_metrics

from .conftest import (BATCH, DATA, GPU_TIER, HARDWARE, ON_CPU, assert_learned, fit, metric_ok, run_ok,
                       train_losses)

pytestmark = [*GPU_TIER, pytest.mark.usefixtures("deepspeed_importable")]  # skips, with the reason, without DeepSpeed

STRATEGIES = {
    "zero2_bf16": ["trainer.strategy=deepspeed", "trainer.zero_stage=2", "trainer.precision=bf16-mixed"],
    "zero3_offload": ["-c", "trainer/deepspeed_zero3_offload"],  # zero_stage 3, both offloads, bf16-mixed
}

SAME_WEIGHTS = 5e-4
"""evaluate's printed metrics (4 decimals) against the export's, both float32 from the same
weights: only rounding of the printout and the order of float32 sums differ."""
BF16_WEIGHTS = 0.01
"""summary.json (ranked with the bf16 copy of the weights) against evaluate (their fp32 masters):
bf16 keeps 8 bits of mantissa, enough to swap near-tied items in some of the 2,000 users'
rankings. Measured on the CPU (id mode, a ZeRO-2 checkpoint of these settings): the bf16 copy of
its weights moved each metric by at most 5e-4 (hr@20; ndcg@10 by 3e-4); 0.01 is 20x that, while a
checkpoint that did not hold the trained weights would be off by ~0.3 (trained 0.34-0.38,
popularity 0.023). In fp32 (the same test with trainer.precision=32-true) all three agree exactly."""
KEYS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")


def _export_metrics(export, cfg, device: torch.device) -> dict[str, float]:
    """Rank the test split with an export folder's towers and item vectors on `device`, as
    `TwoTowerModule.target_ranks` does: the user vector after the newest history item, the
    history filtered when eval.filter_seen."""
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.modules.histories import Histories
    from twotower.modules.metrics import metrics_per_user, target_ranks
    from twotower.serving.export_format import load_exported

    exported = load_exported(export)
    model, vectors = exported.model.to(device), exported.vectors.to(device)
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    ranks = []
    with torch.inference_mode():
        for history, target in ShardDataModule(cfg).eval_dataloader("test"):
            history, target = Histories(*(part.to(device) for part in history)), target.to(device)
            users = model.user_vectors(history.newest(cfg.data.max_len), vectors)
            exclude = history.items if cfg.eval.filter_seen else None
            ranks.append(target_ranks(users, vectors, target, exclude, cfg.eval.score_chunk_size)[target >= 0])
    per_user = metrics_per_user(torch.cat(ranks).cpu(), cfg.eval.ks)
    return {name: values.mean().item() for name, values in per_user.items()}


@pytest.fixture(params=list(STRATEGIES))
def strategy(request) -> list[str]:
    return STRATEGIES[request.param]


def test_zero_trains_consolidates_resumes_and_evaluates_and_exports_on_the_gpu(strategy, mode, tmp_path):
    from safetensors.torch import load_file

    from twotower.configs import load_config
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.trainers.checkpoints import consolidate_checkpoint
    from twotower.trainers.evaluate import load_module

    run = tmp_path / "run"
    overrides = [*strategy, *DATA, *mode, f"trainer.accelerator={HARDWARE.accelerator}",
                 f"trainer.devices={HARDWARE.zero_devices}", f"data.batch_size={BATCH}", f"data.dir={tmp_path / 'data'}"]
    if ON_CPU:  # two CPU processes: one thread each
        overrides.append("trainer.num_threads=1")

    # One epoch: finite losses and a ZeRO checkpoint folder (one shard per rank).
    first, _ = fit(run, *overrides, "trainer.max_epochs=1")
    assert first["epochs"] == 1 and first["steps"] > 0
    metric_ok(first)
    first_loss = train_losses(run)["train/loss"].mean()
    last = run / "checkpoints" / "last.ckpt"
    assert (last / "checkpoint").is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())

    # It consolidates into plain fp32 tensors that load into the module (strict load_state_dict).
    state = consolidate_checkpoint(last)
    weights = state["state_dict"]
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    cfg = load_config([run / "config.yaml"])
    module = load_module(str(last), ShardDataModule(cfg))
    assert set(module.state_dict()) == set(weights)

    # Resume: a second epoch from last.ckpt.
    second, resumed = fit(run, *overrides, "trainer.max_epochs=2", "trainer.resume=auto")
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stderr, resumed.stderr[-4000:]
    assert second["epochs"] == 2 and second["steps"] == 2 * first["steps"], (first, second)
    metric_ok(second)
    steps = train_losses(run)  # (today a resumed run's metrics.csv holds only the steps it ran itself)
    second_epoch = steps[steps["epoch"] == 1]["train/loss"]
    assert len(second_epoch) > 0, steps["epoch"].unique()
    assert_learned(mode, second, first_loss, second_epoch.mean())

    # evaluate and export of the best checkpoint, on the GPU.
    best = run / "checkpoints" / "best.ckpt"
    device = ["trainer.accelerator=cpu"] if ON_CPU else ["trainer.accelerator=gpu"]
    evaluate = run_ok("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", str(best), *device,
                      "trainer.precision=32-true", cwd=tmp_path)
    if not ON_CPU:  # Lightning's own line about the Trainer that evaluate built
        assert "GPU available: True (cuda), used: True" in evaluate.stdout + evaluate.stderr, evaluate.stderr[-3000:]
    evaluated = printed_metrics(evaluate.stdout, "model (test)")
    export = tmp_path / "export"
    run_ok("export", "--checkpoint", str(best), "--out", str(export), *device, cwd=tmp_path)
    towers = load_file(export / "towers.safetensors")
    best_weights = consolidate_checkpoint(best)["state_dict"]
    for name, tensor in towers.items():
        assert torch.equal(tensor, best_weights[f"model.{name}"]), name  # the checkpoint's fp32 weights, untouched
    exported = _export_metrics(export, cfg, HARDWARE.device)

    assert sorted(evaluated) == sorted(KEYS), evaluated
    for key in KEYS:
        assert evaluated[key] == pytest.approx(exported[key], abs=SAME_WEIGHTS), (key, evaluated, exported)
        assert evaluated[key] == pytest.approx(second[f"test/{key}"], abs=BF16_WEIGHTS), (key, evaluated, second)
