"""The held-out items cut in two (docs/data.md, "Cold start"): `cold_valid` for choosing settings,
`cold` for reporting. The halves are disjoint and together the items the draw held out before the
cut; each item's cases are in its own half only; both stay as first drawn across `prepare --append`;
data prepared before the cut still loads, and says so where cold_valid is asked for."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from twotower.configs import load_config
from twotower.configs.schema import SplitConfig
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import fingerprint, load_raw, prepare, prepare_append
from twotower.datamodules.readers import DataError
from twotower.datamodules.split import choose_cold_items, leave_one_out
from twotower.datamodules.synthetic import TIMELINE, write_time_split

from prepared_cases import evaluation_cases

HELD_OUT = "split.cold_item_fraction=0.2"
ITEMS = pd.Series(np.arange(6), index=list("abcdef"))


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def mask(*names: str) -> np.ndarray:
    return ITEMS.index.isin(names)


def cases(split_cases) -> list[tuple]:
    return [(c.user_id, c.target, c.history.tolist()) for c in split_cases]


def test_each_half_asks_for_its_first_item_given_the_warm_items_before_it():
    rows = [("u1", i, t) for t, i in enumerate("abcdef")] + [("u2", i, t) for t, i in enumerate("dabce")]
    cut = leave_one_out(frame(rows), ITEMS, SplitConfig(), cold_items=mask("b", "d"), cold_valid_items=mask("d"))
    a, b, c, d = range(4)
    assert cases(cut.cold) == [("u1", b, [a]), ("u2", b, [a])]  # u2's d before it is held out: not history
    assert cases(cut.cold_valid) == [("u1", d, [a, c])]  # u2 touched d first: no warm item before it
    uncut = leave_one_out(frame(rows), ITEMS, SplitConfig(), cold_items=mask("b", "d"), cold_valid_items=mask())
    assert cases(uncut.cold) == [("u1", b, [a])] and not uncut.cold_valid  # the protocol before the cut


def test_the_halves_are_disjoint_seeded_and_together_the_held_out_draw():
    orders = np.random.default_rng(0).permuted(np.tile(np.arange(6), (12, 1)), axis=1)
    rows = [(f"u{u}", ITEMS.index[i], t) for u, order in enumerate(orders) for t, i in enumerate(order)]
    cfg = SplitConfig(cold_item_fraction=4 / 6, seed=5)
    cut = leave_one_out(frame(rows), ITEMS, cfg)
    assert np.array_equal(cut.cold_items, choose_cold_items(np.arange(6), 6, cfg))  # the draw is as before the cut
    assert cut.cold_valid_items.sum() == 2 and not (cut.cold_valid_items & ~cut.cold_items).any()
    assert np.array_equal(leave_one_out(frame(rows), ITEMS, cfg).cold_valid_items, cut.cold_valid_items)
    assert all(cut.cold_valid_items[c.target] for c in cut.cold_valid) and cut.cold_valid
    assert all(cut.cold_items[c.target] and not cut.cold_valid_items[c.target] for c in cut.cold) and cut.cold
    none = leave_one_out(frame(rows), ITEMS, SplitConfig(cold_item_fraction=4 / 6, seed=5, cold_valid_share=0.0))
    assert not none.cold_valid_items.any() and not none.cold_valid
    uncut = [case for case in cases(none.cold) if not cut.cold_valid_items[case[1]]]
    assert uncut and all(case in cases(cut.cold) for case in uncut)  # a first held-out item of cold's half: the case as before


def test_the_share_is_in_the_fingerprint_only_where_items_are_held_out(tiny_overrides):
    def key(*more):
        return fingerprint(load_config([], [*tiny_overrides, *more]))

    assert key() == key("split.cold_valid_share=0.3")  # nothing held out: shards prepared before the cut stay current
    assert key(HELD_OUT) != key(HELD_OUT, "split.cold_valid_share=0.3")
    with pytest.raises(Exception, match="split.cold_valid_share=1.5"):
        load_config([], [*tiny_overrides, "split.cold_valid_share=1.5"])


def held_out_of(folder) -> pd.DataFrame:
    manifest = json.loads((folder / "manifest.json").read_text())
    return pd.read_parquet(folder / manifest["items_table"]).set_index("item_id")


def check_halves(folder, cold_valid_present: bool = True) -> pd.DataFrame:
    """Every case of cold_valid and cold has a target of its own half, a history of warm items;
    the manifest counts them. Returns the items table."""
    manifest = json.loads((folder / "manifest.json").read_text())
    table = held_out_of(folder)
    in_cold = table["cold"] & ~table["cold_valid"] if cold_valid_present else table["cold"]
    halves = {"cold": table.index[in_cold]}
    if cold_valid_present:
        halves["cold_valid"] = table.index[table["cold_valid"]]
        assert manifest["counts"]["cold_valid_items"] == len(halves["cold_valid"]) > 0
    else:
        assert "cold_valid" not in manifest["shards"] and "cold_valid" not in manifest["counts"]
    for split, items in halves.items():
        found = evaluation_cases(folder, split)
        assert found and sum(found.values()) == manifest["counts"][split], split
        assert all(target in set(items) and not table.loc[list(history), "cold"].any() for _, target, _, history in found), split
    return table


@pytest.fixture(scope="module")
def timeline(tiny_bert, tmp_path_factory):
    """The built-in data cut in two windows; the early one prepared with a fifth of its items held out."""
    from conftest import tiny

    root = tmp_path_factory.mktemp("cold_valid")
    overrides = tiny(tiny_bert, root)
    paths = write_time_split(load_config([], overrides).data.synthetic, 0.6 * TIMELINE, root / "tables")

    def table(interactions, items, folder, *more):
        return load_config([], [*overrides, HELD_OUT, "data.source=table", f"data.interactions={paths[interactions]}",
                                f"data.items={paths[items]}", f"data.dir={root / folder}", "data.shard_max_count=40", *more])

    return table, prepare(table("early", "early_items", "early"))


def test_prepare_writes_both_halves_and_the_datamodule_reads_them(timeline):
    table, early = timeline
    cfg = table("early", "early_items", "early")
    items = check_halves(early)
    interactions, catalogue, _ = load_raw(cfg.data)
    indices = pd.Series(np.arange(len(catalogue)), index=catalogue["item_id"]).loc[interactions["item_id"]].to_numpy()
    assert np.array_equal(items["cold"].to_numpy(), choose_cold_items(np.unique(indices), len(catalogue), cfg.split))
    assert items["cold_valid"].sum() == round(0.5 * items["cold"].sum())
    data = ShardDataModule(cfg)
    assert len(data.cases("cold_valid")) == data.manifest["counts"]["cold_valid"]


def test_append_keeps_both_halves_as_first_drawn(timeline, tmp_path):
    table, early = timeline
    folder = tmp_path / "appended"
    shutil.copytree(early, folder)
    before = held_out_of(folder)
    prepare_append(table("late", "all_items", folder))
    after = check_halves(folder)
    assert after.loc[before.index, ["cold", "cold_valid"]].equals(before[["cold", "cold_valid"]])
    assert not after.drop(before.index)[["cold", "cold_valid"]].to_numpy().any()  # new items are never held out

    # Each half's cases are those of the whole timeline split with the halves kept.
    events = pd.concat([pd.read_csv(table("early", "all_items", "x").data.interactions),
                        pd.read_csv(table("late", "all_items", "x").data.interactions)], ignore_index=True)
    ids = pd.Series(np.arange(len(after)), index=after.index)
    whole = leave_one_out(events.astype({"user_id": str, "item_id": str}), ids, SplitConfig(cold_item_fraction=0.2),
                          after["cold"].to_numpy(), after["cold_valid"].to_numpy())
    for split in ("cold_valid", "cold"):
        expected = {(c.user_id, after.index[c.target], tuple(after.index[c.history])) for c in getattr(whole, split)}
        assert {(u, t, h) for u, t, _, h in evaluation_cases(folder, split)} == expected, split


def test_data_prepared_before_the_cut_loads_and_appends_uncut(timeline, tmp_path):
    """An older folder: no cold_valid split, no cold_valid column. It reads as before; asking for
    cold_valid names the problem; an append keeps every held-out item's case in cold."""
    table, early = timeline
    folder = tmp_path / "old"
    shutil.copytree(early, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["shards"].pop("cold_valid"):
        manifest["shard_counts"].pop(name)
    for key in ("cold_valid", "cold_valid_items"):
        manifest["counts"].pop(key)
    shutil.rmtree(folder / "cold_valid")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pd.read_parquet(folder / "items.parquet").drop(columns="cold_valid").to_parquet(folder / "items.parquet")

    data = ShardDataModule(table("early", "early_items", folder))
    assert data.cases("cold")
    with pytest.raises(DataError, match="no cold_valid split: prepared before the held-out items were cut"):
        data.cases("cold_valid")
    prepare_append(table("late", "all_items", folder))
    check_halves(folder, cold_valid_present=False)
