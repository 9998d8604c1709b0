"""`prepare`: real tar shards that read back to the split, a manifest that tells the truth, and
no half-written output when the input is bad."""
import io
import json
import tarfile

import numpy as np
import pytest

from configs import load_config
from datamodules.datamodule import ShardDataModule
from datamodules.prepare import load_raw, prepare
from datamodules.readers import DataError


def test_shards_are_tar_files_that_hold_the_split(tiny_overrides, tmp_path):
    cfg = load_config([], tiny_overrides + ["data.shard_max_count=100", "split.cold_item_fraction=0.1"])
    out = prepare(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["schema_version"] == 1 and manifest["tokenizer"]["sha256"]
    assert counts["items"] == 120 and counts["cold_items"] > 0 and counts["cold"] > 0
    assert len(manifest["shards"]["train"]) == -(-counts["train_users"] // 100)  # size-bounded shards

    # Read the first training shard with nothing but the standard library.
    with tarfile.open(out / manifest["shards"]["train"][0]) as tar:
        names = tar.getnames()
        seq = np.load(io.BytesIO(tar.extractfile(names[0] if names[0].endswith(".npy") else names[1]).read()))
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"npy", "json"} and seq.dtype == np.int32

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


def test_prepare_is_skipped_when_up_to_date_and_redone_when_the_config_changes(tiny_overrides, capsys):
    cfg = load_config([], tiny_overrides)
    out = prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare(cfg)
    assert "up to date" in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns == stamp
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
