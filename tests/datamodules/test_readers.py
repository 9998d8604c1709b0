"""Tests of twotower.datamodules.readers: formats, column mapping, every bad-input error, skip mode, MovieLens.

Every fixture file is written here, in tmp_path; only `test_real_ml100k` reads the shared copy of
MovieLens-100K (and is skipped when it is absent).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower.configs.schema import ColumnsConfig
from twotower.datamodules.readers import DataError, check_consistency, read_interactions, read_items, read_movielens

from helpers import SHARED_DATA, raises

ML100K = SHARED_DATA / "ml-100k"
ROWS = [
    {"user_id": "u2", "item_id": "007", "timestamp": 30, "rating": 4.5, "event": "buy"},
    {"user_id": "u1", "item_id": "12", "timestamp": 10, "rating": 3.0, "event": "click"},
    {"user_id": "u1", "item_id": "007", "timestamp": 20, "rating": 1.0, "event": "click"},
]


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def write_table(folder: Path, name: str, rows: list[dict]) -> Path:
    """The same rows in the format the name's extension says (ids written as strings)."""
    path, frame = folder / name, pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


def interactions(tmp_path: Path, content: str | bytes, name: str = "interactions.csv", **kwargs):
    return read_interactions(write(tmp_path, name, content), ColumnsConfig(), **kwargs)


def items(tmp_path: Path, content: str | bytes, name: str = "items.csv", **kwargs):
    return read_items(write(tmp_path, name, content), "item_id", ["title", "text"], **kwargs)


# ---------------------------------------------------------------------------------------------
# Formats and columns


@pytest.mark.parametrize("name", ["x.csv", "x.tsv", "x.parquet", "x.jsonl", "x.json"])
def test_every_format_reads_the_same_frame(tmp_path, name):
    frame, counts = read_interactions(write_table(tmp_path, name, ROWS), ColumnsConfig())
    assert counts == {}
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "rating", "event", "line", "file"]
    assert frame["user_id"].tolist() == ["u2", "u1", "u1"]  # file order, not sorted
    assert frame["item_id"].tolist() == ["007", "12", "007"]  # ids kept as written
    assert frame["timestamp"].tolist() == [30.0, 10.0, 20.0]
    assert frame["rating"].tolist() == [4.5, 3.0, 1.0]
    assert frame["event"].tolist() == ["buy", "click", "click"]
    assert frame["timestamp"].dtype == np.float64 and frame["rating"].dtype == np.float64
    assert frame["line"].dtype == np.int64
    assert all(pd.api.types.is_string_dtype(frame[column]) for column in ("user_id", "item_id", "event"))
    first = 1 if name.endswith((".parquet", ".jsonl", ".json")) else 2  # CSV/TSV: line 1 is the header
    assert frame["line"].tolist() == [first, first + 1, first + 2]


def test_custom_column_names_and_optional_columns(tmp_path):
    path = write(tmp_path, "log.csv", "who,what,when,stars,event\nA,x,5,2,view\nB,y,6,3,view\n")
    columns = ColumnsConfig(user_id="who", item_id="what", timestamp="when", rating="stars", event=None)
    frame, _ = read_interactions(path, columns)
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "rating", "line", "file"]  # event not configured
    assert frame["user_id"].tolist() == ["A", "B"] and frame["rating"].tolist() == [2.0, 3.0]


def test_absent_optional_columns_are_fine(tmp_path):
    frame, _ = interactions(tmp_path, "user_id,item_id,timestamp\n1,2,3\n")
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "line", "file"]


def test_iso_timestamps_become_epoch_seconds(tmp_path):
    content = (
        "user_id,item_id,timestamp\n"
        "1,a,2020-01-01T00:00:00Z\n"
        "1,b,2020-01-01\n"  # no zone: UTC
        "1,c,2020-01-01T02:00:00+02:00\n"
        "1,d,1577836800\n"
        "1,e,2020-01-01T00:00:01.5Z\n"
    )
    frame, _ = interactions(tmp_path, content)
    assert frame["timestamp"].tolist() == [1577836800.0] * 4 + [1577836801.5]


def test_blank_lines_and_quoted_line_breaks_keep_line_numbers(tmp_path):
    content = 'item_id,title,text\n1,A,x\n\n2,"B\nstill B",y\n\r\n3,C,\n'
    frame, _ = items(tmp_path, content)
    assert frame["item_id"].tolist() == ["1", "2", "3"]
    assert frame["line"].tolist() == [2, 4, 7]
    assert frame["title"].tolist() == ["A", "B\nstill B", "C"]
    assert frame["text"].tolist() == ["x", "y", ""]
    raises(lambda: items(tmp_path, content + "2,again,z\n"), "line 8", "duplicate item id '2'", "line 4")


def test_items_text_fields_and_missing_values(tmp_path):
    rows = [{"sku": "a", "title": "T", "text": None}, {"sku": "b", "title": None, "text": "words"}]
    for name in ("cat.jsonl", "cat.parquet"):
        frame, _ = read_items(write_table(tmp_path, name, rows), "sku", ["title", "text"])
        assert frame.to_dict("list") == {"item_id": ["a", "b"], "title": ["T", ""], "text": ["", "words"], "line": [1, 2]}


def test_whole_float_ids_read_as_ints(tmp_path):
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [1.0, 2.0], "item_id": [7.0, None], "timestamp": [1.5, 2.0]}).to_parquet(path)
    raises(lambda: read_interactions(path, ColumnsConfig()), "events.parquet, row 2", "empty item id")
    frame, _ = read_interactions(path, ColumnsConfig(), on_bad_row="skip")
    assert frame["user_id"].tolist() == ["1"] and frame["item_id"].tolist() == ["7"]
    assert frame["timestamp"].tolist() == [1.5]


def test_utf8_bom_is_ignored(tmp_path):
    frame, _ = interactions(tmp_path, "\ufeffuser_id,item_id,timestamp\n1,2,3\n")
    assert frame["user_id"].tolist() == ["1"]


# ---------------------------------------------------------------------------------------------
# Errors: each names the file, the line (or row) and the problem

HEADER = "user_id,item_id,timestamp,rating\n"
NO_USER_ID = "column 'user_id' (data.columns.user_id) not found"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["empty file"]),
        (HEADER, ["empty file (no rows)"]),
        ("user,item_id,timestamp\n1,2,3\n", [NO_USER_ID, "columns are: user, item_id, timestamp"]),
        (HEADER + "1,2,3,4\n1,2,3,4,5\n", ["line 3", "expected 4 fields, found 5"]),
        (HEADER + "1,2,3,4\n1,2\n", ["line 3", "expected 4 fields, found 2"]),
        (HEADER + "1,2,3,4\n1,2,3,4\n1,2,abc,4\n", ["line 4", "column 'timestamp': 'abc' is not a number"]),
        (HEADER + "1,2,3,4\n1,2,,4\n", ["line 3", "column 'timestamp': '' is not a number"]),
        (HEADER + "1,2,3,five\n", ["line 2", "column 'rating': 'five' is not a number"]),
        (HEADER + "1,2,3,inf\n", ["line 2", "column 'rating': 'inf' is not a number"]),
        (HEADER + "1,2,3,4\n ,2,3,4\n", ["line 3", "empty user id"]),
        (HEADER + "1,2,3,4\n1,,3,4\n", ["line 3", "empty item id"]),
        (HEADER.encode() + b"1,2,3,4\n1,caf\xe9,3,4\n", ["line 3", "not valid UTF-8", "0xe9", "byte offset 46", "byte 6 of"]),
        (HEADER + '1,2,3,4\n1,"2\n', ["line 3"]),
    ],
)
def test_csv_errors(tmp_path, content, words):
    raises(lambda: interactions(tmp_path, content), "interactions.csv", *words)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1, \n', ["line 2", "not valid JSON"]),
        ('{"user_id": 1, "item_id": 2, "timestamp": 3}\n\n[1, 2, 3]\n', ["line 3", "not a JSON object"]),
        ('{"user_id": 1, "item_id": 2, "timestamp": null}\n', ["line 1", "column 'timestamp': null is not a number"]),
        ('{"user_id": null, "item_id": 2, "timestamp": 3}\n', ["line 1", "empty user id"]),
        ('{"user": 1, "item_id": 2, "timestamp": 3}\n', [NO_USER_ID, "columns are: user, item_id, timestamp"]),
        ("\n\n", ["empty file"]),
    ],
)
def test_jsonl_errors(tmp_path, content, words):
    raises(lambda: interactions(tmp_path, content, name="events.jsonl"), "events.jsonl", *words)


@pytest.mark.parametrize("name", ["interactions.csv", "interactions.jsonl", "interactions.parquet"])
def test_empty_optional_values_are_missing_values(tmp_path, name):
    """An empty (or null) rating or event is a missing value, in every format; a present value
    that is not a number is still refused."""
    rows = [{"user_id": "u1", "item_id": "a", "timestamp": 1, "rating": "4", "event": "buy"},
            {"user_id": "u1", "item_id": "b", "timestamp": 2, "rating": "", "event": ""},
            {"user_id": "u2", "item_id": "a", "timestamp": 3, "rating": None, "event": None},
            {"user_id": "u2", "item_id": "b", "timestamp": 4, "rating": " ", "event": "view"}]
    frame, skipped = read_interactions(write_table(tmp_path, name, rows), ColumnsConfig())
    assert skipped == {}
    assert frame["rating"].tolist()[0] == 4.0 and frame["rating"].isna().tolist() == [False, True, True, True]
    assert frame["event"].tolist() == ["buy", "", "", "view"]
    rows[1]["rating"] = "four"
    raises(lambda: read_interactions(write_table(tmp_path, name, rows), ColumnsConfig()), name, "'four' is not a number")


def test_parquet_errors_name_the_row(tmp_path):
    rows = [{"user_id": "1", "item_id": "2", "timestamp": "3"}, {"user_id": "1", "item_id": "2", "timestamp": "soon"}]
    path = write_table(tmp_path, "events.parquet", rows)
    raises(lambda: read_interactions(path, ColumnsConfig()), "events.parquet, row 2", "'soon' is not a number")
    broken = write(tmp_path, "broken.parquet", "user_id,item_id\n")
    raises(lambda: read_interactions(broken, ColumnsConfig()), "broken.parquet", "not a readable Parquet file")


def test_file_level_errors(tmp_path):
    raises(lambda: read_interactions(tmp_path / "nope.csv", ColumnsConfig()), "nope.csv", "file not found")
    path = write(tmp_path, "events.xlsx", "x")
    raises(lambda: read_interactions(path, ColumnsConfig()), "events.xlsx", "unknown file type", ".csv", ".parquet", ".jsonl")
    raises(lambda: interactions(tmp_path, "user_id,user_id,timestamp\n1,2,3\n"), "line 1", "duplicate column names", "user_id")
    raises(lambda: interactions(tmp_path, "\nuser_id,item_id,timestamp\n1,2,3\n"), "line 1", "empty header")


def test_item_errors(tmp_path):
    raises(lambda: items(tmp_path, "item_id,title,text\n"), "items.csv", "empty catalogue")
    raises(lambda: items(tmp_path, b""), "items.csv", "empty catalogue")
    raises(
        lambda: items(tmp_path, "item_id,title\n1,A\n"),
        "items.csv", "column 'text' (data.text_fields) not found", "columns are: item_id, title",
    )
    duplicate = "item_id,title,text\n1,A,a\n2,B,b\n1,C,c\n"
    raises(lambda: items(tmp_path, duplicate), "items.csv, line 4", "duplicate item id '1'", "line 2")
    raises(lambda: items(tmp_path, "item_id,title,text\n1,A,a\n,B,b\n"), "items.csv, line 3", "empty item id")
    raises(lambda: items(tmp_path, b"item_id,title,text\n1,Caf\xe9,a\n"), "items.csv, line 2", "not valid UTF-8")


# ---------------------------------------------------------------------------------------------
# Skip mode


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    content = (
        HEADER.encode()
        + b"1,a,1,5\n"  # line 2: good
        + b"1,b,soon,5\n"  # 3: bad timestamp
        + b"1,c,3\n"  # 4: wrong field count
        + b"1,d,4,great\n"  # 5: bad rating
        + b",e,5,5\n"  # 6: empty user
        + b"1,\xff,6,5\n"  # 7: not UTF-8
        + b"1,f,never,5\n"  # 8: bad timestamp
        + b"2,g,8,1\n"  # 9: good
    )
    frame, counts = interactions(tmp_path, content, on_bad_row="skip")
    assert counts == {"bad_timestamp": 2, "unparsable_row": 1, "bad_rating": 1, "empty_user_id": 1, "non_utf8": 1}
    assert frame["item_id"].tolist() == ["a", "g"]
    assert frame["line"].tolist() == [2, 9]


def test_skip_mode_items_keep_the_first_duplicate(tmp_path):
    frame, counts = items(tmp_path, "item_id,title,text\n1,A,a\n2,B,b\n1,C,c\n,D,d\n", on_bad_row="skip")
    assert counts == {"duplicate_item_id": 1, "empty_item_id": 1}
    assert frame["title"].tolist() == ["A", "B"]


def test_skip_mode_still_raises_on_file_problems(tmp_path):
    raises(lambda: interactions(tmp_path, "user,item_id,timestamp\n1,2,3\n", on_bad_row="skip"), "column 'user_id'")
    raises(lambda: interactions(tmp_path, HEADER, on_bad_row="skip"), "empty file")
    raises(lambda: items(tmp_path, "item_id,title,text\n", on_bad_row="skip"), "empty catalogue")
    raises(
        lambda: interactions(tmp_path, HEADER + "1,2,x,1\n1,2,3\n", on_bad_row="skip"),
        "interactions.csv", "every row was bad", "bad_timestamp: 1", "unparsable_row: 1",
    )


# ---------------------------------------------------------------------------------------------
# Native MovieLens folders

U_ITEM_FLAGS = {"Action": 1, "Comedy": 5}  # genre name -> flag position in u.item


def u_item_line(item: int, title: str, genres: list[str]) -> str:
    flags = ["0"] * 19
    for genre in genres:
        flags[U_ITEM_FLAGS[genre]] = "1"
    return f"{item}|{title}|01-Jan-1995||http://example.org/{item}|" + "|".join(flags) + "\n"


def write_ml100k(folder: Path, genre_file: bool = True) -> None:
    folder.mkdir()
    write(folder, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n")
    u_item = u_item_line(242, "Café Society (1995)", ["Comedy"]) + u_item_line(302, "Heat (1995)", ["Action", "Comedy"])
    write(folder, "u.item", u_item.encode("latin-1"))
    if genre_file:
        names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy"] + [f"g{i}" for i in range(6, 19)]
        write(folder, "u.genre", "".join(f"{name}|{i}\n" for i, name in enumerate(names)) + "\n")


@pytest.mark.parametrize("genre_file", [True, False])
def test_movielens_100k(tmp_path, genre_file):
    write_ml100k(tmp_path / "ml", genre_file)
    events, catalogue, counts = read_movielens(tmp_path / "ml")
    assert counts == {}
    assert events.to_dict("list") == {
        "user_id": ["196", "186", "196"],
        "item_id": ["242", "302", "302"],
        "timestamp": [881250949.0, 891717742.0, 881250950.0],
        "rating": [3.0, 3.0, 5.0],
        "line": [1, 2, 3],
    }
    assert catalogue.to_dict("list") == {
        "item_id": ["242", "302"],
        "title": ["Café Society (1995)", "Heat (1995)"],
        "genres": ["Comedy", "Action, Comedy"],
        "line": [1, 2],
    }


def test_movielens_1m(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    write(folder, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    movies = "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Star Wars: Episode IV - Café (1977)::Action|Sci-Fi\n"
    write(folder, "movies.dat", movies.encode("latin-1"))
    events, catalogue, _ = read_movielens(folder)
    assert events["item_id"].tolist() == ["1193", "661"] and events["rating"].tolist() == [5.0, 3.0]
    assert events["timestamp"].tolist() == [978300760.0, 978302109.0]
    assert catalogue["title"].tolist() == ["One Flew Over the Cuckoo's Nest (1975)", "Star Wars: Episode IV - Café (1977)"]
    assert catalogue["genres"].tolist() == ["Drama", "Action, Sci-Fi"]


def test_movielens_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    raises(lambda: read_movielens(tmp_path / "empty"), "empty", "u.data + u.item", "ratings.dat + movies.dat")
    raises(lambda: read_movielens(tmp_path / "missing"), "missing", "not a MovieLens folder")
    write_ml100k(tmp_path / "ml")
    write(tmp_path / "ml", "u.data", "196\t242\t3\t881250949\n186\t302\t3\n")
    raises(lambda: read_movielens(tmp_path / "ml"), "u.data, line 2", "expected 4 fields, found 3")
    events, _, counts = read_movielens(tmp_path / "ml", on_bad_row="skip")
    assert counts == {"unparsable_row": 1} and len(events) == 1


# ---------------------------------------------------------------------------------------------
# Interactions against the catalogue


def test_check_consistency(tmp_path):
    events, _ = interactions(tmp_path, HEADER + "1,a,1,5\n1,zz,2,5\n2,b,3,5\n")
    catalogue, _ = items(tmp_path, "item_id,title,text\na,A,\nb,B,\n")
    raises(
        lambda: check_consistency(events, catalogue, "interactions.csv", "items.csv"),
        "interactions.csv, line 3", "unknown item id 'zz'", "items.csv",
    )
    kept, counts = check_consistency(events, catalogue, "interactions.csv", "items.csv", on_bad_row="skip")
    assert counts == {"unknown_item": 1}
    assert kept["item_id"].tolist() == ["a", "b"] and kept["line"].tolist() == [2, 4]
    no_items = catalogue.iloc[:0]
    raises(lambda: check_consistency(events, no_items, "interactions.csv", "items.csv"), "items.csv", "empty catalogue")
    other_items = catalogue.assign(item_id=["x", "y"])
    raises(
        lambda: check_consistency(events, other_items, "interactions.csv", "items.csv", on_bad_row="skip"),
        "interactions.csv", "unknown_item: 3",
    )


@pytest.mark.skipif(not ML100K.is_dir(), reason=f"{ML100K} (the shared MovieLens-100K copy) is not on this machine")
def test_real_ml100k():
    events, _ = read_interactions(ML100K / "interactions.csv", ColumnsConfig())
    catalogue, _ = read_items(ML100K / "items.csv", "item_id", ["title", "text"])
    events, counts = check_consistency(events, catalogue, ML100K / "interactions.csv", ML100K / "items.csv")
    assert counts == {}
    assert len(events) == 100000 and events["user_id"].nunique() == 943 and len(catalogue) == 1682


# ---------------------------------------------------------------------------------------------
# Whatever the bytes, the readers give valid frames or a DataError

CELLS = st.sampled_from(["1", "2", "a", "", " ", "x y", '"', '"q,q"', "2020-01-01", "nan", "-1e3", "é", "\x00", "\r"])
NUMBERS = st.lists(st.sampled_from(["1", "2", "3"]), min_size=3, max_size=6)  # rows that can be valid
ROW = st.one_of(st.lists(CELLS, max_size=6), NUMBERS).map(",".join)
HEADERS = st.sampled_from(
    ["user_id,item_id,timestamp,rating,title,text", "item_id,title,text", "user_id,item_id,timestamp", "a,b"]
)
CONTENT = st.one_of(
    st.binary(max_size=120),
    st.tuples(HEADERS, st.lists(ROW, max_size=8), st.sampled_from(["\n", "\r\n"])).map(
        lambda parts: (parts[2].join([parts[0], *parts[1]])).encode()
    ),
    st.tuples(HEADERS, st.lists(ROW, max_size=8), st.binary(max_size=6)).map(
        lambda parts: "\n".join([parts[0], *parts[1]]).encode() + parts[2]
    ),
)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=CONTENT, on_bad_row=st.sampled_from(["raise", "skip"]))
def test_random_csv_gives_valid_frames_or_data_error(tmp_path, content, on_bad_row):
    path = write(tmp_path, "random.csv", content)
    try:
        events, _ = read_interactions(path, ColumnsConfig(), on_bad_row)
    except DataError:
        pass
    else:
        assert len(events) > 0 and np.isfinite(events["timestamp"]).all()
        assert (events["user_id"].str.strip() != "").all() and (events["item_id"].str.strip() != "").all()
        assert events["line"].is_monotonic_increasing and events["line"].min() >= 2
    try:
        catalogue, _ = read_items(path, "item_id", ["title", "text"], on_bad_row)
    except DataError:
        pass
    else:
        assert len(catalogue) > 0 and catalogue["item_id"].is_unique
        assert list(catalogue.columns) == ["item_id", "title", "text", "line"]
