"""`prepare --append` and `twotower update`: a model trained on an early time window, then brought
up to date with a later one (new events, new users and new items), beats the stale model on the
later window's users."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare, prepare_append
from twotower.datamodules.readers import DataError
from twotower.datamodules.synthetic import TIMELINE, write_time_split
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.trainers.evaluate import load_module

from helpers import twotower

CUT = 0.7 * TIMELINE
"Events before this time train the stale model; the rest arrive later."


def _write_tables(tmp_path, overrides: list[str]) -> dict[str, str]:
    return write_time_split(load_config([], overrides).data.synthetic, CUT, tmp_path / "tables")


def test_append_keeps_item_indices_adds_new_items_and_marks_the_window(tiny_overrides, tmp_path):
    paths = _write_tables(tmp_path, tiny_overrides)
    base = load_config([], tiny_overrides + ["data.source=table", f"data.interactions={paths['early']}", f"data.items={paths['early_items']}"])
    out = prepare(base)
    before = json.loads((out / "item_ids.json").read_text())

    later = load_config([], tiny_overrides + ["data.source=table", f"data.interactions={paths['late']}", f"data.items={paths['all_items']}"])
    prepare_append(later)
    manifest = json.loads((out / "manifest.json").read_text())
    after = json.loads((out / manifest["item_ids"]).read_text())
    all_items = pd.read_csv(paths["all_items"], dtype=str)
    assert after[: len(before)] == before  # trained ID embeddings stay valid
    assert sorted(after[len(before):]) == sorted(set(all_items["item_id"]) - set(before))
    assert manifest["appends"][0]["new_items"] == len(after) - len(before) > 0

    # The window's test users, counted independently: users whose newest event is a later one.
    events = pd.concat([pd.read_csv(paths["early"], dtype={"user_id": str}), pd.read_csv(paths["late"], dtype={"user_id": str})])
    newest = events.groupby("user_id")["timestamp"].max()
    since = pd.read_csv(paths["late"])["timestamp"].min()
    assert manifest["window"]["since"] == since
    assert manifest["counts"]["test_window"] == int((newest[newest.index.isin(
        [u for u, n in events.groupby("user_id").size().items() if n >= 3])] >= since).sum())

    # The base config still finds the folder up to date; the same append again is a no-op.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare(base)
    prepare_append(later)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_append_needs_prepared_data(tiny_overrides):
    with pytest.raises(DataError, match="nothing to append to"):
        prepare_append(load_config([], tiny_overrides))


def test_update_on_a_later_window_beats_the_stale_checkpoint(tiny_overrides, tmp_path):
    paths = _write_tables(tmp_path, tiny_overrides)
    common = [o for o in tiny_overrides if not o.startswith("trainer.max_epochs")]
    common += ["model.mode=id", "data.source=table", "trainer.max_epochs=8", "model.user.time_gaps=true"]  # fit, reload, update with a feature
    fit = twotower("fit", *common, f"data.interactions={paths['early']}", f"data.items={paths['early_items']}", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    append = twotower("prepare", "--append", *common, f"data.interactions={paths['late']}", f"data.items={paths['all_items']}", cwd=tmp_path)
    assert append.returncode == 0, append.stderr[-3000:]

    checkpoint = tmp_path / "run" / "checkpoints" / "best.ckpt"
    update = twotower("update", "--checkpoint", str(checkpoint), "update.epochs=4", cwd=tmp_path)
    assert update.returncode == 0, update.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "updates" / "round-1" / "summary.json").read_text())
    stale, updated = summary["stale/test_window/ndcg@10"], summary["updated/test_window/ndcg@10"]
    assert summary["kept"] == "updated"
    print(f"test_window NDCG@10: stale {stale:.4f}, updated {updated:.4f}")
    assert updated > stale + 0.02, (stale, updated)
    assert updated > summary["popularity/test_window/ndcg@10"]
    assert "updated (test_window)" in update.stdout


def test_update_without_appended_data_is_a_clear_error(tiny_overrides, tmp_path):
    prepare(load_config([], tiny_overrides))
    update = twotower("update", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.ckpt"), *tiny_overrides, cwd=tmp_path)
    assert update.returncode == 2 and "prepare --append" in update.stderr


def test_update_grows_the_action_embeddings_for_actions_new_since_training(tiny_overrides, tmp_path):
    """The early window knows one action (`view`), the appended one brings `skip`: the update's
    model keeps the trained rows (and codes) and starts the new action's row fresh."""
    paths = _write_tables(tmp_path, tiny_overrides + ["data.synthetic.stray_fraction=0.2"])
    pd.read_csv(paths["early"]).assign(event="view").to_csv(paths["early"], index=False)
    common = tiny_overrides + ["model.mode=id", "data.source=table", "model.user.actions=true"]
    early = load_config([], common + [f"data.interactions={paths['early']}", f"data.items={paths['early_items']}"])
    prepare(early)
    trained_on = ShardDataModule(early)
    assert trained_on.actions == ["view"]
    trained = TwoTowerModule(early, trained_on.num_items, trained_on.catalogue.train_counts, trained_on.catalogue.cold, 1)
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, tmp_path / "early.ckpt")

    prepare_append(load_config([], common + [f"data.interactions={paths['late']}", f"data.items={paths['all_items']}"]))
    data = ShardDataModule(early)
    assert data.actions == ["view", "skip"]  # the code given first is kept
    grown = load_module(str(tmp_path / "early.ckpt"), data, new_items=True).model.user_tower.actions.weight
    old = trained.model.user_tower.actions.weight
    assert grown.shape == (3, old.shape[1]) and torch.equal(grown[:2], old)  # rows: code 0 (none), view, then skip
