"""`prepare --append` writes only the new window's training shards: the old and new training
shards together hold exactly the training cases of a fresh prepare of all the events, and the
evaluation splits are those of the fresh prepare (docs/data.md, "Appending")."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare, prepare_append
from twotower.datamodules.readers import DataError
from twotower.datamodules.synthetic import TIMELINE, write_time_split

from prepared_cases import evaluation_cases, training_cases


def digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


@pytest.fixture
def timeline(tiny_overrides, tmp_path):
    """The built-in data cut in two windows, plus the same events as one partitioned folder (the
    early file sorts first, so input order is the same)."""
    paths = write_time_split(load_config([], tiny_overrides).data.synthetic, 0.6 * TIMELINE, tmp_path / "tables")
    both = tmp_path / "all"
    both.mkdir()
    shutil.copy(paths["early"], both / "part-0.csv")
    shutil.copy(paths["late"], both / "part-1.csv")
    return paths, both


def table(overrides, interactions, items, folder) -> list[str]:
    return overrides + ["data.source=table", f"data.interactions={interactions}", f"data.items={items}",
                        f"data.dir={folder}", "data.shard_max_count=40"]


def test_append_adds_shards_whose_cases_complete_a_fresh_prepare(tiny_overrides, tmp_path, timeline):
    paths, both = timeline
    appended = prepare(load_config([], table(tiny_overrides, paths["early"], paths["early_items"], tmp_path / "appended")))
    old = json.loads((appended / "manifest.json").read_text())
    before = digests(appended, old["shards"]["train"])

    prepare_append(load_config([], table(tiny_overrides, paths["late"], paths["all_items"], tmp_path / "appended")))
    manifest = json.loads((appended / "manifest.json").read_text())
    fresh = prepare(load_config([], table(tiny_overrides, both, paths["all_items"], tmp_path / "fresh")))

    # The old training shards are the same files, byte for byte; the new ones are the round's own.
    assert digests(appended, old["shards"]["train"]) == before
    new_shards = [s for s in manifest["shards"]["train"] if s not in old["shards"]["train"]]
    assert new_shards and all(s.startswith("appends/r0001/train/") for s in new_shards)
    assert training_cases(appended) == training_cases(fresh)
    for split in ("valid", "test", "cold"):
        assert evaluation_cases(appended, split) == evaluation_cases(fresh, split), split
    fresh_counts = json.loads((fresh / "manifest.json").read_text())["counts"]
    for key in ("interactions", "users", "items", "train_users", "train_events", "valid", "test", "dropped_users"):
        assert manifest["counts"][key] == fresh_counts[key], key

    # The superseded evaluation shards and tables are gone; only what the manifest lists is left.
    tars = {str(p.relative_to(appended)) for p in appended.rglob("*.tar")}
    assert tars == set(manifest["shard_counts"])

    # The window's users (their newest event after the cut) are the window splits.
    since = pd.read_csv(paths["late"])["timestamp"].min()
    assert manifest["window"]["since"] == since
    assert evaluation_cases(appended, "test_window") == Counter(c for c in evaluation_cases(fresh, "test") if c[2] >= since)


def test_a_second_append_reads_every_round(tiny_overrides, tmp_path, timeline):
    """Three windows appended one after another hold the cases of one fresh prepare."""
    paths, both = timeline
    late = pd.read_csv(paths["late"], dtype={"user_id": str, "item_id": str})
    cut = late["timestamp"].quantile(0.5)
    late[late["timestamp"] < cut].to_csv(tmp_path / "late-a.csv", index=False)
    late[late["timestamp"] >= cut].to_csv(tmp_path / "late-b.csv", index=False)
    folder = tmp_path / "appended"
    prepare(load_config([], table(tiny_overrides, paths["early"], paths["early_items"], folder)))
    prepare_append(load_config([], table(tiny_overrides, tmp_path / "late-a.csv", paths["all_items"], folder)))
    prepare_append(load_config([], table(tiny_overrides, tmp_path / "late-b.csv", paths["all_items"], folder)))
    fresh = prepare(load_config([], table(tiny_overrides, both, paths["all_items"], tmp_path / "fresh")))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [a["round"] for a in manifest["appends"]] == [1, 2] and len(manifest["events"]) == 3
    assert training_cases(folder) == training_cases(fresh)
    assert evaluation_cases(folder, "test") == evaluation_cases(fresh, "test")


def test_an_event_older_than_the_prepared_ones_is_refused_and_nothing_changes(tiny_overrides, tmp_path, timeline):
    paths, _ = timeline
    folder = tmp_path / "appended"
    prepare(load_config([], table(tiny_overrides, paths["late"], paths["all_items"], folder)))
    manifest = (folder / "manifest.json").read_bytes()
    with pytest.raises(DataError, match=r"user '\w+': a new interaction at t=\d+ comes before interactions prepared earlier"):
        prepare_append(load_config([], table(tiny_overrides, paths["early"], paths["all_items"], folder)))
    assert (folder / "manifest.json").read_bytes() == manifest and not (folder / "appends").exists()


def test_the_training_stream_trains_each_case_once(tiny_overrides, tmp_path, timeline):
    """The loader reads an appended round's samples as their new targets only (the older items are
    history): one pass over old and new shards trains exactly the fresh prepare's cases."""
    paths, both = timeline
    folder = tmp_path / "appended"
    longer = ["data.max_len=1000", "data.batch_size=16"]  # no crop: every case keeps its whole history
    prepare(load_config([], table(tiny_overrides + longer, paths["early"], paths["early_items"], folder)))
    cfg = load_config([], table(tiny_overrides + longer, paths["late"], paths["all_items"], folder))
    prepare_append(cfg)
    fresh = prepare(load_config([], table(tiny_overrides + longer, both, paths["all_items"], tmp_path / "fresh")))
    data = ShardDataModule(cfg)
    ids = data.catalogue.item_ids
    trained = Counter()
    for inputs, targets in data.train_dataset():
        for row in range(len(targets)):
            for position in torch.nonzero(targets[row] >= 0).flatten().tolist():
                history = inputs.items[row, : position + 1]
                trained[(ids[int(targets[row, position])], tuple(ids[i] for i in history[history >= 0].tolist()))] += 1
    expected = Counter()
    for (_, target, history), n in training_cases(fresh).items():  # the stream does not say whose case it is
        expected[(target, history)] += n
    assert trained == expected
