"""`evaluate` and `export` run on the configured accelerator (`trainer.accelerator`): one function
maps it to a torch device, a GPU asked for where there is none fails with one clear line (never a
silent CPU run), and on the CPU both give what the run itself gave."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny
from helpers import printed_metrics, twotower

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.trainers.checkpoints import consolidate_checkpoint
from twotower.trainers.evaluate import load_module

ON_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def test_accelerator_maps_to_one_device():
    from twotower.trainers.evaluate import accelerator_device

    assert accelerator_device("cpu") == torch.device("cpu")
    assert accelerator_device("cpu", cuda_available=True) == torch.device("cpu")
    assert accelerator_device("auto", cuda_available=False) == torch.device("cpu")
    assert accelerator_device("auto", cuda_available=True) == torch.device("cuda")
    assert accelerator_device("gpu", cuda_available=True) == torch.device("cuda")
    assert accelerator_device("cuda", cuda_available=True) == torch.device("cuda")
    assert accelerator_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for gpu in ("gpu", "cuda"):
        with pytest.raises(ValueError, match=rf"trainer\.accelerator={gpu}.*GPU.*trainer\.accelerator=cpu"):
            accelerator_device(gpu, cuda_available=False)
    with pytest.raises(ValueError, match="trainer.accelerator=tpu"):
        accelerator_device("tpu")


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory):
    """A tiny id-mode run, one epoch, trained on the CPU."""
    folder = tmp_path_factory.mktemp("accelerator")
    fit = twotower("fit", *tiny(tiny_bert, folder), "model.mode=id", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                   cwd=folder)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return folder / "run"


def _one_clear_line(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "trainer.accelerator=gpu" in errors[0] and "GPU" in errors[0], errors[0]
    return errors[0]


@ON_CPU_ONLY
@pytest.mark.slow
def test_a_gpu_asked_for_without_one_fails_with_one_clear_line(run):
    """Before: evaluate ran on the CPU whatever the config, and export encoded there."""
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    evaluate = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", checkpoint, "trainer.accelerator=gpu",
                        cwd=run.parent)
    assert evaluate.stdout == "", evaluate.stdout  # no metrics from a silent CPU run
    assert _one_clear_line(evaluate).startswith("twotower evaluate: error: ")
    out = run.parent / "export-gpu"
    export = twotower("export", "--checkpoint", checkpoint, "--out", str(out), "trainer.accelerator=gpu", cwd=run.parent)
    assert _one_clear_line(export).startswith("twotower export: error: ")
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_on_the_cpu_reproduces_the_runs_metrics(run):
    on_cpu = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
                      "trainer.accelerator=cpu", cwd=run.parent)
    assert on_cpu.returncode == 0, on_cpu.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    printed = printed_metrics(on_cpu.stdout, "model (test)")
    assert len(printed) == 6
    for name, value in printed.items():
        assert value == pytest.approx(summary[f"test/{name}"], abs=5e-5), name


@pytest.mark.slow
def test_export_on_the_cpu_writes_the_checkpoints_weights_and_vectors(run):
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    out = run.parent / "export-cpu"
    on_cpu = twotower("export", "--checkpoint", checkpoint, "--out", str(out), "trainer.accelerator=cpu", cwd=run.parent)
    assert on_cpu.returncode == 0, on_cpu.stderr[-3000:]
    weights = consolidate_checkpoint(checkpoint)["state_dict"]
    towers = load_file(out / "towers.safetensors")
    assert towers and all(t.device.type == "cpu" for t in towers.values())
    for name, tensor in towers.items():
        assert torch.equal(tensor, weights[f"model.{name}"]), name  # the checkpoint's weights, untouched
    vectors = load_file(out / "item_vectors.safetensors")["vectors"]
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    cfg = load_config([run / "config.yaml"])
    model = load_module(checkpoint, ShardDataModule(cfg)).model
    with torch.inference_mode():
        torch.testing.assert_close(vectors, model.catalogue_vectors(cfg.eval.item_batch_size), atol=1e-6, rtol=1e-6)
