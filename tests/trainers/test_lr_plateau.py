"""`trainer.lr_plateau_patience`: the learning rate is cut by `trainer.lr_plateau_factor` each time
validation NDCG@10 has not improved for that many validations. Reference: the rule replayed by hand
on the run's own logged validation curve, against the rate the optimizer logged at every step."""
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


def test_the_rate_is_cut_after_flat_validations(tiny_bert, tmp_path):
    overrides = [o for o in tiny(tiny_bert, tmp_path) if not o.startswith("trainer.max_epochs")]
    result = twotower("fit", *overrides, "model.mode=id", "trainer.max_epochs=8", f"trainer.lr={LR}",
                      f"trainer.lr_plateau_patience={PATIENCE}", f"trainer.lr_plateau_factor={FACTOR}",
                      "trainer.log_every_n_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    val = metrics["val/ndcg@10"].dropna().tolist()
    assert len(val) == 8
    steps = metrics.dropna(subset=["train/lr"])
    after_warmup = steps[steps["step"] >= 2]  # trainer.warmup_steps=2 in tiny()
    logged = after_warmup.groupby("epoch")["train/lr"].agg(["min", "max"])
    expected = expected_rates(val)
    assert logged["min"].tolist() == pytest.approx(expected, rel=1e-6)
    assert logged["max"].tolist() == pytest.approx(expected, rel=1e-6)  # one rate through each epoch
    assert expected[-1] < LR  # the curve did go flat here, so a cut was tested


@pytest.mark.parametrize("override, message", [
    ("trainer.lr_plateau_patience=-1", "lr_plateau_patience=-1: expected validations >= 0"),
    ("trainer.lr_plateau_factor=1", r"lr_plateau_factor=1.0: expected a factor in \(0, 1\)"),
])
def test_bad_plateau_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([], [override])
