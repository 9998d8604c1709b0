"""Bad input at the door, property-based: whatever fault hypothesis puts into a CSV or JSON Lines
data set (and wherever it puts it), `prepare` either writes complete shards or stops with an error
naming the file (and the line, for a bad row); `data.on_bad_row=skip` drops and counts bad rows; a
failed prepare leaves the previous shards as they were and no temporary folder."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from twotower.configs import load_config
from twotower.datamodules.prepare import prepare
from twotower.datamodules.readers import DataError

FAULTS = ("none", "missing_column", "bad_timestamp", "empty_file", "huge_field", "non_utf8",
          "duplicate_item", "unknown_item", "one_event_user")
ROW_FAULTS = {"bad_timestamp", "non_utf8", "duplicate_item", "unknown_item"}
"Faults in one row: an error names its line; skip mode drops and counts it."


def _frames(users: int, items: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    catalogue = pd.DataFrame({"item_id": [f"i{i}" for i in range(items)], "title": [f"title {i}" for i in range(items)],
                              "text": [f"about thing {i}" for i in range(items)]})
    events = pd.DataFrame([{"user_id": f"u{u}", "item_id": f"i{(u + k) % items}", "timestamp": 1000 * u + k}
                           for u in range(users) for k in range(4)])
    return events, catalogue


def _write(frame: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)


@pytest.fixture(scope="module")
def good_data(tiny_bert, tmp_path_factory):
    """A good prepare of the same shape, to check that a failed one leaves it alone."""
    return tmp_path_factory.mktemp("fuzz"), tiny_bert


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=st.sampled_from(FAULTS), fmt=st.sampled_from(["csv", "jsonl"]), mode=st.sampled_from(["raise", "skip"]),
       users=st.integers(3, 12), items=st.integers(4, 15), where=st.floats(0, 0.999))
def test_prepare_writes_complete_shards_or_names_the_problem(good_data, fault, fmt, mode, users, items, where):
    root, tiny_bert = good_data
    event(f"{fault}, {mode}")
    case = root / f"{fault}-{fmt}-{mode}-{users}-{items}-{int(where * 1000)}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    events, catalogue = _frames(users, items)
    row = int(where * len(events))  # the row the fault goes into
    if fault == "missing_column":
        events = events.drop(columns="timestamp")
    elif fault == "bad_timestamp":
        events["timestamp"] = events["timestamp"].astype(object)
        events.loc[row, "timestamp"] = "yesterday-ish"
    elif fault == "huge_field":
        catalogue.loc[int(where * len(catalogue)), "title"] = "word " * 50_000
    elif fault == "duplicate_item":
        catalogue = pd.concat([catalogue, catalogue.iloc[[int(where * len(catalogue))]]], ignore_index=True)
    elif fault == "unknown_item":
        events.loc[row, "item_id"] = "no-such-item"
    elif fault == "one_event_user":
        events = pd.concat([events, pd.DataFrame([{"user_id": "lonely", "item_id": "i0", "timestamp": 5}])], ignore_index=True)
    paths = {"events": case / f"events.{fmt}", "items": case / f"items.{fmt}"}
    _write(events, paths["events"], fmt)
    _write(catalogue, paths["items"], fmt)
    if fault == "empty_file":
        paths["events"].write_bytes(b"")
    elif fault == "non_utf8":
        lines = paths["items"].read_bytes().split(b"\n")
        bad = 1 + int(where * len(catalogue)) if fmt == "csv" else int(where * len(catalogue))
        lines[bad] = lines[bad].replace(b"title", b"t\xff\xfetle", 1)
        paths["items"].write_bytes(b"\n".join(lines))

    # A good prepare first: a failing one must leave it untouched.
    data_dir = case / "data"
    base = [f"model.item.encoder={tiny_bert}", "data.max_text_len=16", f"data.dir={data_dir}", "data.source=table"]
    good_events, good_items = _frames(3, 4)
    _write(good_events, case / f"good_events.{fmt}", fmt)
    _write(good_items, case / f"good_items.{fmt}", fmt)
    prepare(load_config([], base + [f"data.interactions={case / f'good_events.{fmt}'}", f"data.items={case / f'good_items.{fmt}'}"]))
    good_manifest = (data_dir / "manifest.json").read_text()

    cfg = load_config([], base + [f"data.interactions={paths['events']}", f"data.items={paths['items']}", f"data.on_bad_row={mode}"])
    fails = fault in {"missing_column", "empty_file"} or (fault in ROW_FAULTS and mode == "raise")
    if fails:
        with pytest.raises(DataError) as error:
            prepare(cfg)
        message = str(error.value)
        named = paths["items"] if fault in {"non_utf8", "duplicate_item"} else paths["events"]
        assert named.name in message, message
        if fault in ROW_FAULTS:
            assert "line" in message, message
        assert (data_dir / "manifest.json").read_text() == good_manifest  # the previous shards stay
    else:
        prepare(cfg)
        manifest = json.loads((data_dir / "manifest.json").read_text())
        assert manifest["counts"]["train_users"] >= 1
        if fault in ROW_FAULTS:
            assert sum(manifest["skipped"].values()) >= 1, manifest["skipped"]
        if fault == "one_event_user":
            assert manifest["counts"]["dropped_users"] >= 1
    assert not [p.name for p in case.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
