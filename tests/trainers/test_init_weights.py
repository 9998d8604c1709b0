"""`trainer.init_weights`: a run starts from another run's weights (here: a frozen-encoder run, then
its top layer fine-tuned), with a fresh optimizer; a checkpoint whose parameters do not fit the
model is refused, naming them. Reference: the first run's own best validation NDCG@10, which the
second run must reproduce before its (here negligible) updates move anything."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from twotower.configs import load_config
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.trainers.checkpoints import load_initial_weights

from conftest import tiny
from helpers import twotower

STILL = ["trainer.lr=1e-12", "trainer.max_epochs=1"]
"A run whose updates are far below float32's resolution: its first validation reads its starting weights."


@pytest.fixture(scope="module")
def frozen_run(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("init-weights")
    overrides = [o for o in tiny(tiny_bert, folder) if not o.startswith("model.item.train_layers")]
    overrides += ["model.mode=text", "model.item.train_layers=0"]
    result = twotower("fit", *overrides, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, overrides


def first_validation(run_dir) -> float:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return float(metrics["val/ndcg@10"].dropna().iloc[0])


def test_a_run_starts_from_the_weights_of_another(frozen_run):
    folder, overrides = frozen_run
    best = json.loads((folder / "run" / "summary.json").read_text())["best/val/ndcg@10"]
    start = [*overrides, "model.item.train_layers=1", *STILL]  # the top layer now trains: another training setup
    init = f"trainer.init_weights={folder / 'run' / 'checkpoints' / 'best.ckpt'}"
    for name, extra in (("from-frozen", [init]), ("fresh", [])):
        result = twotower("fit", *start, *extra, f"run.dir={folder / name}", cwd=folder)
        assert result.returncode == 0, result.stderr[-3000:]
    assert first_validation(folder / "from-frozen") == pytest.approx(best, abs=1e-6)
    assert first_validation(folder / "fresh") != pytest.approx(best, abs=1e-3)  # what the weights alone decide


def test_weights_that_do_not_fit_are_refused_naming_them(frozen_run):
    folder, overrides = frozen_run
    checkpoint = str(folder / "run" / "checkpoints" / "best.ckpt")
    items = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]["num_items"]

    def module(*extra: str, num_items: int = items) -> TwoTowerModule:
        cfg = load_config([], [o for o in overrides if not o.startswith(("data.dir", "run.dir"))] + list(extra))
        return TwoTowerModule(cfg, num_items, torch.ones(num_items), torch.zeros(num_items, dtype=torch.bool))

    with pytest.raises(ValueError, match=r"(?s)do not fit this model.*Missing key.*id_embedding\.weight"):
        load_initial_weights(module("model.mode=id+text"), checkpoint, items)
    with pytest.raises(ValueError, match=r"(?s)projection\.weight.*\[32, 32\].*\[16, 32\]"):
        load_initial_weights(module("model.dim=16"), checkpoint, items)
    with pytest.raises(ValueError, match=f"trained on {items} items, this data has {items + 1}"):
        load_initial_weights(module(num_items=items + 1), checkpoint, items + 1)
    with pytest.raises(FileNotFoundError, match="trainer.init_weights=.*no such checkpoint"):
        load_initial_weights(module(), str(folder / "missing.ckpt"), items)
