"""`data.engine=ray`: a real local Ray (started by the first prepare in this module) builds the
same samples as the pandas path from a partitioned input, appends like it, and fails like it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from twotower.configs import load_config
from twotower.datamodules.prepare import prepare, prepare_append
from twotower.datamodules.readers import DataError
from twotower.datamodules.synthetic import TIMELINE, generate, write_time_split

from prepared_cases import evaluation_cases, item_tokens, training_cases

ray = pytest.importorskip("ray", reason="data.engine=ray needs Ray: pip install 'twotower[scale]'")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield
    ray.shutdown()


@pytest.fixture
def partitioned(tiny_overrides, tmp_path):
    """The built-in data as three files of a folder (CSV, Parquet, JSON Lines), in a shuffled row
    order, with times coarsened so that many events tie (order: file, then row), and an event column."""
    interactions, items = generate(load_config([], tiny_overrides).data.synthetic)
    rng = np.random.default_rng(0)
    interactions = interactions.sample(frac=1.0, random_state=1).reset_index(drop=True)
    interactions["timestamp"] = (interactions["timestamp"] // (TIMELINE / 40)) * (TIMELINE / 40)
    interactions["event"] = rng.choice(["view", "buy", ""], size=len(interactions))
    folder = tmp_path / "events"
    (folder / "day=1").mkdir(parents=True)
    (folder / "day=2").mkdir()
    third = len(interactions) // 3
    parts = [interactions.iloc[:third], interactions.iloc[third:2 * third], interactions.iloc[2 * third:]]
    parts[0].to_csv(folder / "day=1" / "a.csv", index=False)
    parts[1].to_parquet(folder / "day=1" / "b.parquet", index=False)
    parts[2].to_json(folder / "day=2" / "c.jsonl", orient="records", lines=True)
    items.to_csv(tmp_path / "items.csv", index=False)
    return folder, tmp_path / "items.csv"


def config(overrides, interactions, items, folder, engine, *more):
    return load_config([], overrides + ["data.source=table", f"data.interactions={interactions}", f"data.items={items}",
                                        f"data.dir={folder}", f"data.engine={engine}", "data.shard_max_count=40", *more])


def test_ray_and_pandas_prepare_the_same_samples(tiny_overrides, tmp_path, partitioned):
    events, items = partitioned
    held_out = "split.cold_item_fraction=0.1"
    by_pandas = prepare(config(tiny_overrides, events, items, tmp_path / "pandas", "pandas", held_out))
    by_ray = prepare(config(tiny_overrides, events, items, tmp_path / "ray", "ray", held_out, "data.engine_partitions=3"))
    assert training_cases(by_ray) == training_cases(by_pandas)
    for split in ("valid", "test", "cold_valid", "cold"):
        assert evaluation_cases(by_ray, split) == evaluation_cases(by_pandas, split), split
    assert item_tokens(by_ray) == item_tokens(by_pandas)
    ours, theirs = (json.loads((folder / "manifest.json").read_text()) for folder in (by_ray, by_pandas))
    assert ours["counts"] == theirs["counts"] and ours["actions"] == theirs["actions"] and ours["fingerprint"] == theirs["fingerprint"]
    assert ours["counts"]["cold"] > 0 and ours["counts"]["cold_valid"] > 0 and len(ours["actions"]["values"]) == 2
    assert pd.read_parquet(by_ray / "items.parquet").equals(pd.read_parquet(by_pandas / "items.parquet"))  # the same halves
    assert {s.split("/")[-1].split("-")[1] for s in ours["shards"]["train"]} == {"p00000", "p00001", "p00002"}  # a task's own shards


def test_ray_append_completes_a_fresh_prepare(tiny_overrides, tmp_path):
    paths = write_time_split(load_config([], tiny_overrides).data.synthetic, 0.6 * TIMELINE, tmp_path / "tables")
    both = tmp_path / "all"
    both.mkdir()
    shutil.copy(paths["early"], both / "part-0.csv")
    shutil.copy(paths["late"], both / "part-1.csv")
    appended = prepare(config(tiny_overrides, paths["early"], paths["early_items"], tmp_path / "appended", "ray"))
    before = json.loads((appended / "manifest.json").read_text())["shards"]["train"]
    stamps = {name: (appended / name).stat().st_mtime_ns for name in before}
    prepare_append(config(tiny_overrides, paths["late"], paths["all_items"], tmp_path / "appended", "ray"))
    fresh = prepare(config(tiny_overrides, both, paths["all_items"], tmp_path / "fresh", "pandas"))
    manifest = json.loads((appended / "manifest.json").read_text())
    assert {name: (appended / name).stat().st_mtime_ns for name in before} == stamps  # not rewritten
    assert manifest["shards"]["train"][: len(before)] == before and manifest["window"]["round"] == 1
    assert training_cases(appended) == training_cases(fresh)
    for split in ("valid", "test"):
        assert evaluation_cases(appended, split) == evaluation_cases(fresh, split)


@pytest.mark.parametrize("bad_row", [
    ("b.parquet", 4, "timestamp", "soon", "row 4: column 'timestamp': 'soon' is not a number or ISO date"),
    ("c.jsonl", 3, "item_id", "nope", "line 3: unknown item id 'nope'"),
])
def test_bad_input_gets_the_pandas_error_and_leaves_nothing(tiny_overrides, tmp_path, partitioned, bad_row):
    events, items = partitioned
    name, row, column, value, expected = bad_row
    path = next(events.rglob(name))
    frame = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_json(path, lines=True, dtype=False)
    frame[column] = frame[column].astype(str)
    frame.loc[row - 1, column] = value  # Parquet rows and JSON lines count from 1
    frame.to_parquet(path, index=False) if name.endswith(".parquet") else frame.to_json(path, orient="records", lines=True)
    errors = {}
    for engine in ("pandas", "ray"):
        with pytest.raises(DataError) as caught:
            prepare(config(tiny_overrides, events, items, tmp_path / engine, engine))
        errors[engine] = str(caught.value)
        assert not (tmp_path / engine).exists() and not list(tmp_path.glob(f".{engine}*"))  # nothing half-written
    assert errors["ray"] == errors["pandas"] and f"{path}, {expected}" in errors["ray"], errors


def test_a_refused_ray_append_changes_nothing(tiny_overrides, tmp_path):
    """An event older than a user's prepared ones is refused inside a reduce task: the driver gets
    the task's own DataError, and the folder stays as it was."""
    paths = write_time_split(load_config([], tiny_overrides).data.synthetic, 0.6 * TIMELINE, tmp_path / "tables")
    folder = prepare(config(tiny_overrides, paths["late"], paths["all_items"], tmp_path / "data", "ray"))
    manifest = (folder / "manifest.json").read_bytes()
    with pytest.raises(DataError, match=r"user '\w+': a new interaction at t=\d+ comes before interactions prepared earlier"):
        prepare_append(config(tiny_overrides, paths["early"], paths["all_items"], folder, "ray"))
    assert (folder / "manifest.json").read_bytes() == manifest and not (folder / "appends").exists()
