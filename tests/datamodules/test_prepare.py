"""`prepare`: real tar shards that read back to the split, a manifest that tells the truth, and
no half-written output when the input is bad."""
import io
import json
import logging
import tarfile

import numpy as np
import pandas as pd
import pytest

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import MAX_ACTIONS, action_codes, load_raw, prepare
from twotower.datamodules.readers import DataError
from twotower.datamodules.shards import read_all


def test_shards_are_tar_files_that_hold_the_split(tiny_overrides, tmp_path):
    cfg = load_config([], tiny_overrides + ["data.shard_max_count=100", "split.cold_item_fraction=0.1"])
    out = prepare(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["schema_version"] == 2 and manifest["tokenizer"]["sha256"]
    assert counts["items"] == 120 and counts["cold_items"] > 0 and counts["cold"] > 0
    assert len(manifest["shards"]["train"]) == -(-counts["train_users"] // 100)  # size-bounded shards

    # Read the first training shard with nothing but the standard library.
    with tarfile.open(out / manifest["shards"]["train"][0]) as tar:
        names = tar.getnames()
        first = {n.split(".", 1)[1]: np.load(io.BytesIO(tar.extractfile(n).read())) for n in names[:4] if n.endswith(".npy")}
    assert {n.split(".", 1)[1] for n in names} >= {"seq.npy", "time.npy", "action.npy", "json"}
    assert (first["seq.npy"].dtype, first["time.npy"].dtype, first["action.npy"].dtype) == (np.int32, np.float64, np.int16)
    assert first["seq.npy"].shape == first["time.npy"].shape == first["action.npy"].shape

    # The shards hold exactly the leave-one-out split of the raw data.
    interactions, items, _ = load_raw(cfg.data)
    data = ShardDataModule(cfg)
    assert data.catalogue.item_ids == list(items["item_id"])
    cold = data.catalogue.cold.numpy()
    last_warm = {}
    for user, group in interactions.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id"):
        warm = [data.catalogue.item_ids.index(i) for i in group["item_id"] if not cold[data.catalogue.item_ids.index(i)]]
        if len(warm) >= 3:
            last_warm[user] = warm
    tests = {c["json"]["user_id"]: c for c in data.cases("test")}
    assert set(tests) == set(last_warm)
    for user, warm in last_warm.items():
        assert tests[user]["json"]["target"] == warm[-1]
        assert tests[user]["history.npy"].tolist() == warm[:-1]
    for case in data.cases("cold"):
        assert cold[case["json"]["target"]]


def test_prepare_is_skipped_when_up_to_date_and_redone_when_the_config_changes(tiny_overrides, caplog):
    cfg = load_config([], tiny_overrides)
    out = prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="twotower"):
        prepare(cfg)
    assert "up to date" in caplog.text and (out / "manifest.json").stat().st_mtime_ns == stamp
    prepare(load_config([], tiny_overrides + ["data.max_text_len=8"]))
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["max_text_len"] == 8


def test_bad_input_leaves_the_previous_shards_untouched_and_no_temporary_folder(tiny_overrides, tmp_path):
    good = prepare(load_config([], tiny_overrides))
    before = sorted(p.relative_to(good) for p in good.rglob("*"))
    interactions, items = tmp_path / "interactions.csv", tmp_path / "items.csv"
    items.write_text("item_id,title,text\na,Alpha,x\nb,Beta,y\n")
    interactions.write_text("user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,zzz,3\n")
    bad = load_config([], tiny_overrides + ["data.source=table", f"data.interactions={interactions}", f"data.items={items}"])
    with pytest.raises(DataError, match=r"interactions.csv.*line 4.*zzz"):
        prepare(bad)
    assert sorted(p.relative_to(good) for p in good.rglob("*")) == before
    assert [p.name for p in good.parent.iterdir() if p.name.startswith(".")] == []


def test_each_event_keeps_its_time_and_action_code_through_shards_and_batches(tiny_overrides, tmp_path):
    """Ratings become action codes (manifest.json lists the values), times travel with the items,
    and a training batch's gap codes are those of the seconds between each item and the one before."""
    interactions, items = tmp_path / "interactions.csv", tmp_path / "items.csv"
    items.write_text("item_id,title,text\n" + "".join(f"i{n},Item {n},x\n" for n in range(6)))
    rows = [("u1", "i0", 10, 5), ("u1", "i1", 10, 3), ("u1", "i2", 70, 4.5), ("u1", "i3", 4000, 1), ("u1", "i4", 4001, 5),
            ("u2", "i5", 7, 3), ("u2", "i0", 9, 3), ("u2", "i1", 1e6, 5)]
    interactions.write_text("user_id,item_id,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in rows))
    overrides = tiny_overrides + ["data.source=table", f"data.interactions={interactions}", f"data.items={items}", "data.max_len=3"]
    out = prepare(load_config([], overrides))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["actions"] == {"column": "rating", "values": ["1", "3", "4.5", "5"]}
    data = ShardDataModule(load_config([], overrides + ["model.user.time_gaps=true", "model.user.actions=true"]))
    code = {"1": 1, "3": 2, "4.5": 3, "5": 4}
    train = {s["json"]["user_id"]: s for s in read_all([str(out / s) for s in manifest["shards"]["train"]])}
    assert train["u1"]["time.npy"].tolist() == [10, 10, 70] and train["u1"]["action.npy"].tolist() == [code["5"], code["3"], code["4.5"]]
    test = {c["json"]["user_id"]: c for c in data.cases("test")}
    assert test["u1"]["time.npy"].tolist() == [10, 10, 70, 4000] and test["u1"]["action.npy"].tolist() == [4, 2, 3, 1]

    (inputs, targets), = list(data.train_dataset())  # u1 (i0 i1 i2); u2's one training item trains nothing
    assert inputs.items.tolist() == [[0, 1]] and targets.tolist() == [[1, 2]]
    # Gaps before i0 and i1: nothing before i0 (0), then 0 s (the same second: code 1).
    assert inputs.gaps.tolist() == [[0, 1]] and inputs.actions.tolist() == [[code["5"], code["3"]]]

    (history, target), = list(data.eval_dataloader("test"))
    row = [n for n, t in enumerate(target.tolist()) if t == 4][0]  # u1: i0 i1 i2 i3 -> i4
    # 0 s -> 1; 60 s -> 1 + floor(log2 61) = 6; 3930 s -> 1 + floor(log2 3931) = 12.
    assert history.items[row].tolist() == [0, 1, 2, 3] and history.gaps[row].tolist() == [0, 1, 6, 12]

    with pytest.raises(DataError, match="data.actions=event: the interactions have no event column"):
        prepare(load_config([], overrides + ["data.actions=event", "data.max_text_len=15"]))


def test_action_codes_keep_the_codes_already_given_and_refuse_too_many_values():
    cfg = load_config([], [])
    frame = pd.DataFrame({"event": ["buy", "view", "cart", "view"], "rating": [1.0, 4.5, 5.0, 1.0]})
    codes, values, column = action_codes(frame, cfg.data)
    assert (column, values, codes.tolist()) == ("event", ["buy", "cart", "view"], [1, 3, 2, 3])  # auto: event first
    # Appending: the prepared codes stay, new values follow.
    codes, values, _ = action_codes(frame, cfg.data, known=["view", "like"])
    assert values == ["view", "like", "buy", "cart"] and codes.tolist() == [3, 1, 4, 1]
    rating = load_config([], ["data.actions=rating"]).data
    codes, values, column = action_codes(frame, rating)
    assert (column, values, codes.tolist()) == ("rating", ["1", "4.5", "5"], [1, 2, 3, 1])
    # A missing value (an empty event, a null rating) is no action: code 0, not a value of its own.
    gaps = pd.DataFrame({"event": ["buy", "", " ", "view"], "rating": [4.0, None, 5.0, float("nan")]})
    codes, values, _ = action_codes(gaps, cfg.data)
    assert (codes.tolist(), values) == ([1, 0, 0, 2], ["buy", "view"])
    codes, values, _ = action_codes(gaps, rating)
    assert (codes.tolist(), values) == ([1, 0, 2, 0], ["4", "5"])
    none = load_config([], ["data.actions=none"]).data
    assert action_codes(frame, none)[1:] == ([], None) and not action_codes(frame, none)[0].any()
    many = pd.DataFrame({"event": [f"e{n}" for n in range(MAX_ACTIONS + 1)]})
    with pytest.raises(DataError, match=f"data.actions=event: {MAX_ACTIONS + 1} distinct values in the event column, at most {MAX_ACTIONS}"):
        action_codes(many, cfg.data)
