"""Read raw interactions and item catalogues into pandas DataFrames, with clear errors.

Formats follow the file's extension: `.csv`, `.tsv`, `.parquet`, `.jsonl` / `.json` (JSON Lines),
plus the native MovieLens folders (ML-100K `u.data`/`u.item`, ML-1M `ratings.dat`/`movies.dat`).
Every frame keeps file order and a `line` column: the 1-based line of the row in the file (header =
line 1), or for Parquet its 1-based row number. Bad input raises `DataError` naming the file, the
line (or row) and the problem; with `on_bad_row="skip"` a bad row is dropped instead and counted
under its kind (`unparsable_row`, `non_utf8`, `empty_user_id`, `empty_item_id`, `bad_timestamp`,
`bad_rating`, `duplicate_item_id`, `unknown_item`). File-level problems (missing file or column,
empty file, no row left) always raise.

CSV/TSV cells are read as strings (pyarrow), so ids such as "007" are kept as written; timestamps
are epoch numbers or ISO-8601 dates (a date without a zone is UTC).
"""
from __future__ import annotations

import csv
import glob
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twotower.configs.schema import ColumnsConfig

FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
"File extension -> format; `.json` files are read as JSON Lines (one object per line)."

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
"The 19 genre flags of ML-100K `u.item`, in order; used when the folder has no `u.genre`."


class DataError(ValueError):
    """Bad input. The message names the file, the row where it applies and the problem, e.g.
    "interactions.csv, line 17: column 'timestamp': 'abc' is not a number or ISO date"."""


class _BadRows:
    """The problems of one file: raises on a bad row (on_bad_row=raise), or drops and counts it (skip)."""

    def __init__(self, path: str | Path, on_bad_row: str) -> None:
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row={on_bad_row!r}: expected raise or skip")
        self.path = Path(path)
        self.unit = "row" if self.path.suffix.lower() == ".parquet" else "line"
        self.skip = on_bad_row == "skip"
        self.counts: Counter[str] = Counter()

    def error(self, problem: str, line: int | None = None) -> DataError:
        where = "" if line is None else f", {self.unit} {line}"
        return DataError(f"{self.path}{where}: {problem}")

    def one(self, line: int, kind: str, problem: str) -> None:
        """One bad row found while parsing: raise, or count it (the caller leaves it out)."""
        if not self.skip:
            raise self.error(problem, line)
        self.counts[kind] += 1

    def drop(self, frame: pd.DataFrame, bad, kind: str, describe: Callable[[pd.Series], str]) -> pd.DataFrame:
        """Rows of `frame` (indexed by line) where `bad` holds: raise for the first, or drop and count them."""
        bad = np.asarray(bad, dtype=bool)
        if not bad.any():
            return frame
        if not self.skip:
            row = frame.iloc[int(bad.argmax())]
            raise self.error(describe(row), row.name)
        self.counts[kind] += int(bad.sum())
        return frame[~bad]

    def require_rows(self, frame: pd.DataFrame, problem: str) -> None:
        if len(frame) == 0:
            skipped = ", ".join(f"{kind}: {n}" for kind, n in self.counts.items())
            raise self.error(problem + (f" (every row was bad and skipped: {skipped})" if skipped else ""))

    def require_columns(self, frame: pd.DataFrame, wanted: list[tuple[str, str]]) -> None:
        """`wanted`: (column, config key) pairs; the first missing column raises."""
        for column, key in wanted:
            if column not in frame.columns:
                have = ", ".join(map(str, frame.columns))
                raise self.error(f"column '{column}' ({key}) not found; columns are: {have}")


def input_files(spec: str | Path) -> list[Path]:
    """The files `data.interactions` / `data.items` name: a file; a folder (every file of a known
    type below it, e.g. a partitioned Parquet data set `day=.../part-0.parquet`); or a glob
    (`logs/*.jsonl`). Sorted by path: the input order that breaks timestamp ties (docs/data.md)."""
    spec = str(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no file matches this pattern")
        return files
    path = Path(spec)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS and not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"{path}: a folder without any {', '.join(FORMATS)} file")
    return files


def read_interactions(
    path: str | Path, columns: ColumnsConfig, on_bad_row: str = "raise"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Interactions as `user_id`, `item_id` (str), `timestamp` (float64 epoch seconds), `rating`
    (float64) and `event` (str) when configured and present, `line`, and `file` (the position of
    the row's file in `input_files(path)`); plus the skipped-row counts."""
    files = input_files(path)
    frames, counts = [], Counter()
    for number, file in enumerate(files):
        rows = _BadRows(file, on_bad_row)
        frames.append(_interactions(_read_table(rows), columns, rows).assign(file=np.int32(number)))
        counts += rows.counts
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], dict(counts)


def read_items(
    path: str | Path, id_column: str, text_fields: list[str], on_bad_row: str = "raise"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The catalogue as `item_id` plus each of `text_fields` (str, missing -> ""), and `line`;
    plus the skipped-row counts. An id given by two files is a duplicate of the first one."""
    files = input_files(path)
    frames, counts = [], Counter()
    for file in files:
        rows = _BadRows(file, on_bad_row)
        frame = _items(_read_table(rows), id_column, text_fields, rows)
        if frames:
            seen = pd.concat([f["item_id"] for f in frames])
            repeated = frame["item_id"].isin(seen).to_numpy()
            frame = rows.drop(frame.set_index(frame["line"].to_numpy()), repeated, "duplicate_item_id",
                              lambda row: f"duplicate item id {_show(row['item_id'])} (already in an earlier file of {path})").reset_index(drop=True)
        frames.append(frame)
        counts += rows.counts
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], dict(counts)


def read_movielens(folder: str | Path, on_bad_row: str = "raise") -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """A native MovieLens folder (ML-100K or ML-1M, told apart by its files): interactions with
    `rating`, items with `item_id`, `title`, `genres` (joined with ", "), and the skipped-row counts."""
    folder = Path(folder)
    rating_names = ["user_id", "item_id", "rating", "timestamp"]
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        ratings, movies = _BadRows(folder / "u.data", on_bad_row), _BadRows(folder / "u.item", on_bad_row)
        raw = _read_delimited(_decode(ratings.path.read_bytes(), ratings), ratings, "\t", rating_names, quote=False)
        genres = _genre_names(folder / "u.genre")
        flags = [f"genre_{i}" for i in range(len(genres))]
        item_names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *flags]
        raw_items = _read_delimited(movies.path.read_bytes().decode("latin-1"), movies, "|", item_names, quote=False)
        raw_items["genres"] = [
            ", ".join(name for name, flag in zip(genres, row) if flag == "1") for row in raw_items[flags].to_numpy()
        ]
    elif (folder / "ratings.dat").is_file() and (folder / "movies.dat").is_file():
        ratings, movies = _BadRows(folder / "ratings.dat", on_bad_row), _BadRows(folder / "movies.dat", on_bad_row)
        # "::" separates fields; pyarrow wants one character, and neither file holds a tab.
        text = _decode(ratings.path.read_bytes(), ratings).replace("::", "\t")
        raw = _read_delimited(text, ratings, "\t", rating_names, quote=False)
        text = movies.path.read_bytes().decode("latin-1").replace("::", "\t")
        raw_items = _read_delimited(text, movies, "\t", ["item_id", "title", "genres"], quote=False)
        raw_items["genres"] = raw_items["genres"].str.replace("|", ", ", regex=False)
    else:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        holds = f"it holds: {', '.join(found[:10])}" if found else "it is missing or empty"
        raise DataError(
            f"{folder}: not a MovieLens folder; expected u.data + u.item (ML-100K) "
            f"or ratings.dat + movies.dat (ML-1M); {holds}"
        )
    interactions = _interactions(raw, ColumnsConfig(event=None), ratings)
    items = _items(raw_items, "item_id", ["title", "genres"], movies)
    return interactions, items, dict(ratings.counts + movies.counts)


def check_consistency(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    interactions_path: str | Path,
    items_path: str | Path,
    on_bad_row: str = "raise",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Interactions whose item is in the catalogue (unknown items raise, or are skipped and counted,
    naming the row's own file where the interactions came from several)."""
    if len(items) == 0:
        raise DataError(f"{items_path}: empty catalogue (no items)")
    files = input_files(interactions_path) if "file" in interactions.columns else [interactions_path]
    unknown = ~interactions["item_id"].isin(items["item_id"]).to_numpy()
    counts: Counter[str] = Counter()
    if unknown.any():
        first_file = int(interactions["file"].iat[int(unknown.argmax())]) if "file" in interactions.columns else 0
        rows = _BadRows(files[first_file], on_bad_row)
        frame = interactions.set_index(interactions["line"].to_numpy())
        frame = rows.drop(frame, unknown, "unknown_item",
                          lambda row: f"unknown item id {_show(row['item_id'])} (not in the catalogue {items_path})")
        interactions, counts = frame.reset_index(drop=True), rows.counts
    if len(interactions) == 0:
        raise DataError(f"{interactions_path}: no interaction has an item of the catalogue {items_path}"
                        + (f" (every row was bad and skipped: unknown_item: {counts['unknown_item']})" if counts else ""))
    return interactions, dict(counts)


def _interactions(raw: pd.DataFrame, columns: ColumnsConfig, rows: _BadRows) -> pd.DataFrame:
    rows.require_rows(raw, "empty file (no rows)")
    user, item, time = columns.user_id, columns.item_id, columns.timestamp
    required = {"user_id": user, "item_id": item, "timestamp": time}
    rows.require_columns(raw, [(name, f"data.columns.{key}") for key, name in required.items()])
    out = pd.DataFrame({"user_id": _text(raw[user]), "item_id": _text(raw[item]), "timestamp": _to_epoch(raw[time])})
    if columns.rating and columns.rating in raw.columns:
        out["rating"] = _to_number(raw[columns.rating])
    if columns.event and columns.event in raw.columns:
        out["event"] = _text(raw[columns.event])

    out = rows.drop(out, out["user_id"].str.strip() == "", "empty_user_id", lambda row: f"column '{user}': empty user id")
    out = rows.drop(out, out["item_id"].str.strip() == "", "empty_item_id", lambda row: f"column '{item}': empty item id")
    out = rows.drop(
        out,
        ~np.isfinite(out["timestamp"]),
        "bad_timestamp",
        lambda row: f"column '{time}': {_show(raw.at[row.name, time])} is not a number or ISO date",
    )
    if "rating" in out.columns:  # an empty or null rating is a missing one (NaN), not a bad one
        out = rows.drop(
            out,
            ~np.isfinite(out["rating"]) & ~_is_empty(raw.loc[out.index, columns.rating]),
            "bad_rating",
            lambda row: f"column '{columns.rating}': {_show(raw.at[row.name, columns.rating])} is not a number",
        )
    rows.require_rows(out, "no rows")
    return _with_line(out)


def _items(raw: pd.DataFrame, id_column: str, text_fields: list[str], rows: _BadRows) -> pd.DataFrame:
    rows.require_rows(raw, "empty catalogue (no items)")
    rows.require_columns(raw, [(id_column, "data.item_id_column"), *((field, "data.text_fields") for field in text_fields)])
    out = pd.DataFrame({"item_id": _text(raw[id_column]), **{field: _text(raw[field]) for field in text_fields}})
    empty = out["item_id"].str.strip() == ""
    out = rows.drop(out, empty, "empty_item_id", lambda row: f"column '{id_column}': empty item id")
    ids = out["item_id"]

    def duplicate(row: pd.Series) -> str:
        first = ids.index[ids == row["item_id"]][0]
        return f"duplicate item id {_show(row['item_id'])} (first on {rows.unit} {first})"

    out = rows.drop(out, ids.duplicated(), "duplicate_item_id", duplicate)
    rows.require_rows(out, "empty catalogue (no items)")
    return _with_line(out)


def _read_table(rows: _BadRows) -> pd.DataFrame:
    """The file of `rows` as a frame of its raw columns, indexed by line (or row) number."""
    path = rows.path
    if not path.is_file():
        raise rows.error("file not found")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise rows.error(f"unknown file type {path.suffix!r}; expected one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        return pd.DataFrame()
    if fmt == "parquet":
        try:
            frame = pq.read_table(path).to_pandas(integer_object_nulls=True)
        except (pa.ArrowException, OSError) as err:
            raise rows.error(f"not a readable Parquet file ({err})") from None
        return frame.set_axis(np.arange(1, len(frame) + 1))
    text = _decode(path.read_bytes(), rows)
    if fmt == "jsonl":
        return _read_json_lines(text, rows)
    return _read_delimited(text, rows, "," if fmt == "csv" else "\t")


def _decode(data: bytes, rows: _BadRows) -> str:
    """`data` as UTF-8 text (a leading BOM dropped). A line with invalid bytes raises, or (skip) is
    blanked, so that the lines after it keep their numbers."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        lines, offset = data.split(b"\n"), 0
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.one(
                    number,
                    "non_utf8",
                    f"not valid UTF-8: byte 0x{line[err.start]:02x} at byte offset {offset + err.start} "
                    f"of the file (byte {err.start + 1} of the line)",
                )
                lines[number - 1] = b""
            offset += len(line) + 1
        text = b"\n".join(lines).decode("utf-8")
    return text.removeprefix("\ufeff")


def _read_delimited(
    text: str, rows: _BadRows, sep: str, names: list[str] | None = None, quote: bool = True
) -> pd.DataFrame:
    """Delimited text as string columns indexed by line number; blank lines are dropped. Without
    `names`, the first line is the header."""
    if not text.strip():
        return pd.DataFrame()
    first = 1
    if names is None:
        header = re.match(r"[^\r\n]*", text).group()
        if not header.strip():
            raise rows.error("empty header (expected the column names on the first line)", 1)
        try:
            quoting = csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE
            names = next(csv.reader([header], delimiter=sep, quoting=quoting), [])
        except csv.Error as err:
            raise rows.error(f"cannot read the header ({err})", 1) from None
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise rows.error(f"duplicate column names in the header: {', '.join(duplicated)}", 1)
        first = 2
    bad_rows = []

    def keep_bad(row):  # pyarrow calls this for a row with the wrong number of fields
        bad_rows.append(row)
        return "skip"

    if not text.endswith(("\n", "\r")):
        text += "\n"  # pyarrow cannot find the end of a header that ends the file
    try:
        table = pacsv.read_csv(
            pa.py_buffer(text.encode()),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=first - 1, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=sep,
                quote_char='"' if quote else False,
                newlines_in_values=quote,
                ignore_empty_lines=False,
                invalid_row_handler=keep_bad,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
            ),
        )
    except pa.ArrowException as err:
        raise rows.error(f"cannot parse the file ({err})") from None
    frame = table.to_pandas()

    # pyarrow numbers records (header = 1, use_threads=False); a quoted value with line breaks
    # makes its record span several lines, which pushes every later record down.
    records = np.arange(first, first + len(frame) + len(bad_rows))
    bad = np.zeros(len(records), dtype=bool)
    bad[[row.number - first for row in bad_rows]] = True
    lines = records.copy()
    if quote and '"' in text:
        breaks = np.zeros(len(records), dtype=np.int64)
        breaks[~bad] = sum(frame[column].str.count("\n").to_numpy(dtype=np.int64) for column in frame.columns)
        breaks[bad] = [row.text.count("\n") for row in bad_rows]
        lines += np.cumsum(breaks) - breaks

    for row in bad_rows:
        problem = f"expected {row.expected_columns} fields, found {row.actual_columns}"
        rows.one(int(lines[row.number - first]), "unparsable_row", problem)
    frame.index = lines[~bad]
    return frame[frame.ne("").any(axis=1)]


def _read_json_lines(text: str, rows: _BadRows) -> pd.DataFrame:
    """JSON Lines (one object per line) as a frame indexed by line number; blank lines are skipped."""
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            rows.one(number, "unparsable_row", f"not valid JSON ({err})")
            continue
        if not isinstance(record, dict):
            rows.one(number, "unparsable_row", "not a JSON object (JSON Lines: one {...} per line)")
            continue
        records.append(record)
        lines.append(number)
    return pd.DataFrame(records, index=lines, dtype=object)


def _genre_names(path: Path) -> list[str]:
    """ML-100K genre names in flag order: from `u.genre` (`name|index` lines) if present."""
    if not path.is_file():
        return list(ML100K_GENRES)
    pairs = [line.rsplit("|", 1) for line in path.read_bytes().decode("latin-1").splitlines() if line.strip()]
    try:
        return [name for name, _ in sorted(pairs, key=lambda pair: int(pair[1]))]
    except (ValueError, IndexError):
        raise DataError(f"{path}: expected lines 'name|index'") from None


def _text(values: pd.Series) -> pd.Series:
    """Values as strings; missing values become "". A float column of whole numbers (ints with a
    missing value, as pandas writes them) reads as ints: 1.0 -> "1"."""
    if pd.api.types.is_float_dtype(values):
        whole = values.dropna()
        if ((whole % 1 == 0) & (whole.abs() < 2**53)).all():
            values = values.astype("Int64")
    return values.astype(str).where(values.notna(), "")


def _is_empty(values: pd.Series) -> pd.Series:
    """True where a cell holds no value: null, or only whitespace."""
    return values.isna() | (values.astype(str).str.strip() == "")


def _to_number(values: pd.Series) -> pd.Series:
    """Values as float64; NaN where a value is not a number."""
    try:
        return values.astype("float64")
    except (TypeError, ValueError):
        return pd.to_numeric(_text(values), errors="coerce").astype("float64")


def _to_epoch(values: pd.Series) -> pd.Series:
    """Epoch seconds (float64) of numbers or ISO-8601 dates; NaN where a value is neither."""
    seconds = _to_number(values)
    dates = seconds.isna()
    if dates.any():
        parsed = pd.to_datetime(_text(values[dates]), format="ISO8601", utc=True, errors="coerce")
        seconds[dates] = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return seconds


def _show(value) -> str:
    """A raw cell for an error message: quoted if text, shortened, "null" if missing."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "null"
    shown = repr(value) if isinstance(value, str) else str(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _with_line(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame, indexed by line, as a plain frame with a `line` column."""
    return frame.assign(line=frame.index.to_numpy(dtype=np.int64)).reset_index(drop=True)
