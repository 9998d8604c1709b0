"""`trainer.lr_plateau_patience`: the learning rate is cut by `trainer.lr_plateau_factor` each time
validation NDCG@10 has not improved for that many validations, and training goes on from the best
weights so far. References: the rule replayed by hand on the run's own logged validation curve,
against the rate the optimizer logged at every step; with a cut to a rate too small to move the
weights, the validation after a cut reproduces the best one before it; a run stopped half-way and
resumed follows the uninterrupted run's curve (the schedule's state is in the checkpoint)."""
from __future__ import annotations

import pandas as pd
import pytest

from twotower.configs import load_config

from conftest import tiny
from helpers import twotower

LR, FACTOR, PATIENCE = 0.05, 0.5, 1


def expected_rates(val: list[float]) -> list[float]:
    """The rate each epoch trains at, from the validations before it (the warm-up ends in epoch 0)."""
    rates, rate, best, flat = [LR], LR, float("-inf"), 0
    for score in val[:-1]:
        best, flat = (score, 0) if score > best else (best, flat + 1)
        if flat == PATIENCE:
            rate, flat = rate * FACTOR, 0
        rates.append(rate)
    return rates


def plateau_fit(tiny_bert, folder, *extra: str, factor: float = FACTOR) -> pd.DataFrame:
    """A run with the plateau schedule in `folder`/run (data in `folder`/data), and its metrics.csv."""
    overrides = [o for o in tiny(tiny_bert, folder) if not o.startswith("trainer.max_epochs")]
    result = twotower("fit", *overrides, "model.mode=id", f"trainer.lr={LR}", f"trainer.lr_plateau_patience={PATIENCE}",
                      f"trainer.lr_plateau_factor={factor}", "trainer.log_every_n_steps=1", *extra, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return pd.read_csv(folder / "run" / "metrics.csv")


def rates_per_epoch(metrics: pd.DataFrame) -> pd.DataFrame:
    """The lowest and highest rate logged in each epoch, after the warm-up (trainer.warmup_steps=2 in tiny())."""
    steps = metrics.dropna(subset=["train/lr"])
    return steps[steps["step"] >= 2].groupby("epoch")["train/lr"].agg(["min", "max"])


@pytest.fixture(scope="module")
def whole(tiny_bert, tmp_path_factory) -> pd.DataFrame:
    return plateau_fit(tiny_bert, tmp_path_factory.mktemp("whole"), "trainer.max_epochs=8")


def test_the_rate_is_cut_after_flat_validations(whole):
    val = whole["val/ndcg@10"].dropna().tolist()
    assert len(val) == 8
    logged, expected = rates_per_epoch(whole), expected_rates(val)
    assert logged["min"].tolist() == pytest.approx(expected, rel=1e-6)
    assert logged["max"].tolist() == pytest.approx(expected, rel=1e-6)  # one rate through each epoch
    assert expected[-1] < LR  # the curve did go flat here, so a cut was tested


def test_after_a_cut_training_goes_on_from_the_best_weights(tiny_bert, tmp_path):
    val = plateau_fit(tiny_bert, tmp_path, "trainer.max_epochs=6", factor=1e-9)["val/ndcg@10"].dropna().tolist()
    cut = next(epoch for epoch, rate in enumerate(expected_rates(val)) if rate < LR)  # the first epoch after a cut
    assert max(val[:cut]) > val[cut - 1]  # the weights it ended on were not the best ones
    for epoch in range(cut, len(val)):  # at 5e-11 the updates vanish: each validation reads the restored weights
        assert val[epoch] == pytest.approx(max(val[:cut]), abs=1e-6)


def test_a_resumed_run_keeps_the_schedule(tiny_bert, tmp_path, whole):
    plateau_fit(tiny_bert, tmp_path, "trainer.max_epochs=4")
    resumed = plateau_fit(tiny_bert, tmp_path, "trainer.max_epochs=8", f"trainer.resume={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    # test_training_faults.py's tolerance for a resumed run: the threads' float sums may differ in the last bits
    assert resumed["val/ndcg@10"].dropna().tolist()[-4:] == pytest.approx(whole["val/ndcg@10"].dropna().tolist()[-4:], abs=2e-3)
    assert rates_per_epoch(resumed).loc[4:].values.ravel().tolist() == pytest.approx(rates_per_epoch(whole).loc[4:].values.ravel().tolist(), rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("trainer.lr_plateau_patience=-1", "lr_plateau_patience=-1: expected validations >= 0"),
    ("trainer.lr_plateau_factor=1", r"lr_plateau_factor=1.0: expected a factor in \(0, 1\)"),
])
def test_bad_plateau_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([], [override])
