"""Read the Amazon Reviews JSON Lines files (McAuley lab) into the frames of `datamodules.readers`.

Two files, each plain or gzipped (told apart by the gzip magic bytes, not the name), one JSON object
per line, from one of two releases, told apart by their fields:

- 2018 ("Amazon Review Data 2018"; the 2014 files read the same): reviews `reviewerID`, `asin`,
  `overall`, `unixReviewTime` (seconds; `reviewTime` "MM DD, YYYY" when absent); metadata keyed by
  `asin`: an item is a product.
- 2023 ("Amazon Reviews 2023"): reviews `user_id`, `parent_asin`, `rating`, `timestamp`
  (milliseconds); metadata keyed by `parent_asin`: an item is a parent product (its colours and
  sizes are one item).

Metadata becomes the text fields (the same columns for both releases; every value is a string):

| column | 2018 field | 2023 field | lists are joined with |
|---|---|---|---|
| `title` | `title` | `title` | |
| `brand` | `brand` | `store` (else `details["Brand"]`) | |
| `categories` | `category` (2014: `categories`, a list of paths) | `categories` | " > " (2014: paths joined with ", ") |
| `features` | `feature` | `features` | ". " |
| `description` | `description` | `description` | " " |
| `main_category` | `main_cat` | `main_category` | |
| `details` | `details` | `details` | "key: value" pairs joined with ", " |

HTML is reduced to its text (tags dropped, entities decoded, `<script>`/`<style>` skipped),
whitespace collapsed, and each column cut at a word boundary to `FIELD_CHARS` characters, so that
one long description cannot crowd the other fields out of the tokenizer's budget
(`data.max_text_len` tokens over the fields of `data.text_fields`, in that order).

Policies (the counts go to the manifest's `skipped`, next to the bad-row kinds of `readers`):
- Line numbers are those of the (decompressed) file; blank lines are skipped.
- A line that is not JSON is tried as a Python literal (`ast.literal_eval`, never `eval`): the 2014
  metadata was written that way; the 2018 and 2023 files are strict JSON.
- The release is that of the first object of the reviews file. An object of the other release,
  or of neither, is a bad row (`unparsable_row`); a metadata file whose first object is of the
  other release is always an error (the two releases key items differently).
- The catalogue is the reviewed items that have metadata, in metadata file order. Metadata rows of
  items that no review mentions are dropped (`unreviewed_item`). Reviews of an item without a
  metadata row are unknown items (`readers.check_consistency`: an error, or with
  `data.on_bad_row=skip` dropped and counted as `unknown_item`).
- Duplicate metadata rows (one item id on several lines): a row identical in every column to the
  first is dropped (`duplicate_metadata`, never an error); a differing one is a duplicate item id
  (`duplicate_item_id`: an error naming both lines, or skipped keeping the first).
- A metadata row with an empty title is kept (its other fields still describe it).
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import re
import zlib
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pandas as pd

from twotower.configs.schema import ColumnsConfig
from twotower.datamodules.readers import _BadRows, _interactions, _show, _with_line

REVIEW_FIELDS = {
    "2018": ColumnsConfig(user_id="reviewerID", item_id="asin", timestamp="unixReviewTime", rating="overall", event=None),
    "2023": ColumnsConfig(user_id="user_id", item_id="parent_asin", timestamp="timestamp", rating="rating", event=None),
}
"The review fields of each release, as the column mapping of `readers` (errors name these fields)."

REVIEW_SIGNATURES = {"2023": ("user_id", "parent_asin"), "2018": ("reviewerID",)}
METADATA_SIGNATURES = {"2023": ("parent_asin",), "2018": ("asin",)}
"A record is of the first release that has one of these fields (2023 reviews also have `asin`)."

ITEM_KEY = {"2018": "asin", "2023": "parent_asin"}
"The metadata field that holds the item id, per release."

FIELD_CHARS = {
    "title": 200, "brand": 80, "categories": 200, "features": 400, "description": 600, "main_category": 80, "details": 400,
}
"The item columns, in order, and the most characters each keeps (cut at a word boundary)."

_TAG = re.compile(r"<[^>]*>")

_BLOCK_TAGS = {"br", "p", "div", "li", "ul", "ol", "tr", "td", "th", "table", "hr", "h1", "h2", "h3", "h4", "h5", "h6"}


def read_amazon(
    reviews: str | Path, metadata: str | Path, on_bad_row: str = "raise"
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Interactions (`user_id`, `item_id`, `timestamp` in epoch seconds, `rating`, `line`) from the
    reviews file, items (`item_id`, the `FIELD_CHARS` columns, `line`) from the metadata file, and
    the skipped-row counts. Unknown items are left in the interactions for `check_consistency`."""
    review_rows, meta_rows = _BadRows(reviews, on_bad_row), _BadRows(metadata, on_bad_row)
    release, interactions = _read_reviews(review_rows)
    items = _read_metadata(meta_rows, release, set(interactions["item_id"]), review_rows.path)
    return interactions, items, dict(review_rows.counts + meta_rows.counts)


def _read_reviews(rows: _BadRows) -> tuple[str, pd.DataFrame]:
    """The release of the reviews file and its interactions frame."""
    release, values, lines = None, [], []
    for number, record in _records(rows):
        found = _release(record, REVIEW_SIGNATURES)
        if found is None or found != (release or found):
            rows.one(number, "unparsable_row", _not_of(release, found, record, "review"))
            continue
        release = found
        fields = REVIEW_FIELDS[release]
        time = record.get(fields.timestamp)
        if time is None and release == "2018" and isinstance(record.get("reviewTime"), str):
            time = _review_time(record["reviewTime"])
        values.append((record.get(fields.user_id), record.get(fields.item_id), time, record.get(fields.rating)))
        lines.append(number)
    fields = REVIEW_FIELDS[release or "2023"]
    names = [fields.user_id, fields.item_id, fields.timestamp, fields.rating]
    raw = pd.DataFrame(values, index=lines, columns=names, dtype=object)
    interactions = _interactions(raw, fields, rows)
    if release == "2023":
        interactions["timestamp"] /= 1000.0  # milliseconds -> seconds
    return release, interactions


def _read_metadata(rows: _BadRows, release: str, reviewed: set[str], reviews: Path) -> pd.DataFrame:
    """The catalogue of the reviewed items (see the module's policies)."""
    first, values, lines, checked = {}, [], [], False
    for number, record in _records(rows):
        found = _release(record, METADATA_SIGNATURES)
        if found is not None and not checked:
            checked = True
            if found != release:
                raise rows.error(f"metadata of the {found} release, but the reviews {reviews} are of the "
                                 f"{release} release (told by their first objects); use the files of one release", number)
        if found != release:
            rows.one(number, "unparsable_row", _not_of(release, found, record, "metadata row"))
            continue
        key = record[ITEM_KEY[release]]
        item_id = "" if key is None else str(key)
        if not item_id.strip():
            rows.one(number, "empty_item_id", f"field '{ITEM_KEY[release]}': empty item id")
            continue
        if item_id not in reviewed:
            rows.counts["unreviewed_item"] += 1
            continue
        text = _item_text(record, release)
        if item_id in first:
            line, seen = first[item_id]
            if text == seen:
                rows.counts["duplicate_metadata"] += 1
            else:
                rows.one(number, "duplicate_item_id",
                         f"duplicate item id {_show(item_id)} with different metadata (first on line {line})")
            continue
        first[item_id] = (number, text)
        values.append((item_id, *text))
        lines.append(number)
    items = pd.DataFrame(values, index=lines, columns=["item_id", *FIELD_CHARS], dtype=object)
    rows.require_rows(items, f"no metadata row for any item of the reviews {reviews} (empty catalogue)")
    return _with_line(items.astype(str))


def _records(rows: _BadRows) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file, plain or gzipped."""
    path = rows.path
    if not path.is_file():
        raise rows.error("file not found")
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    number = 0
    try:
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as lines:
            for number, data in enumerate(lines, 1):
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    rows.one(number, "non_utf8", f"not valid UTF-8: byte 0x{data[err.start]:02x} at byte {err.start + 1} of the line")
                    continue
                if number == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                record = _parse(line, number, rows)
                if record is not None:
                    yield number, record
    except (OSError, EOFError, zlib.error) as err:  # a corrupt or truncated gzip stream
        raise rows.error(f"cannot read the file after line {number} ({err})") from None


def _parse(line: str, number: int, rows: _BadRows) -> dict | None:
    """One line as a dict: JSON, else a Python literal (the 2014 metadata); None (counted) if neither."""
    try:
        record = json.loads(line)
    except ValueError as err:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            rows.one(number, "unparsable_row", f"not valid JSON ({err})")
            return None
    if not isinstance(record, dict):
        rows.one(number, "unparsable_row", "not a JSON object (JSON Lines: one {...} per line)")
        return None
    return record


def _release(record: dict, signatures: dict[str, tuple[str, ...]]) -> str | None:
    """The release whose signature fields the record has (the first that matches), or None."""
    return next((release for release, names in signatures.items() if any(n in record for n in names)), None)


def _not_of(release: str | None, found: str | None, record: dict, kind: str) -> str:
    if found is None:
        signatures = REVIEW_SIGNATURES if kind == "review" else METADATA_SIGNATURES
        wanted = " / ".join(dict.fromkeys(name for names in signatures.values() for name in names))
        fields = ", ".join(list(record)[:8]) + (", ..." if len(record) > 8 else "")
        return f"neither a 2018 nor a 2023 Amazon {kind} (no {wanted} field); its fields are: {fields or 'none'}"
    return f"a {found}-release {kind}, but the reviews are of the {release} release (told by their first object)"


def _review_time(text: str) -> float | str:
    """2018 `reviewTime` ("09 13, 2009") as epoch seconds (UTC); the text itself if it is not such a date."""
    try:
        return datetime.strptime(text.strip(), "%m %d, %Y").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return text


def _item_text(record: dict, release: str) -> tuple[str, ...]:
    """The `FIELD_CHARS` columns of one metadata object, cleaned and cut."""
    if release == "2023":
        details = record.get("details") if isinstance(record.get("details"), dict) else {}
        text = {
            "title": _joined(record.get("title"), " "),
            "brand": _joined(record.get("store") or details.get("Brand"), " "),
            "categories": _joined(record.get("categories"), " > "),
            "features": _joined(record.get("features"), ". "),
            "description": _joined(record.get("description"), " "),
            "main_category": _joined(record.get("main_category"), " "),
            "details": _joined(details, ", "),
        }
    else:
        categories = record.get("category", record.get("categories"))
        paths = isinstance(categories, list) and any(isinstance(path, list) for path in categories)  # 2014
        text = {
            "title": _joined(record.get("title"), " "),
            "brand": _joined(record.get("brand"), " "),
            "categories": _joined(categories, ", ", inner=" > ") if paths else _joined(categories, " > "),
            "features": _joined(record.get("feature"), ". "),
            "description": _joined(record.get("description"), " "),
            "main_category": _joined(record.get("main_cat"), " "),
            "details": _joined(record.get("details"), ", "),
        }
    return tuple(_cut(text[name], limit) for name, limit in FIELD_CHARS.items())


def _joined(value, sep: str, inner: str | None = None) -> str:
    """A JSON value as clean text (`_clean`): a list's entries joined with `sep` (nested lists with
    `inner`, default `sep`; empty entries left out), a dict as "key: value" pairs joined with `sep`."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list):
        parts = (_joined(v, inner or sep) for v in value)
        if sep == ". ":  # sentences: one full stop between them
            parts = (p.rstrip(". ") for p in parts)
        return sep.join(p for p in parts if p)
    if isinstance(value, dict):
        pairs = ((_clean(str(k)).rstrip(": "), _joined(v, ", ")) for k, v in value.items())
        return sep.join(f"{k}: {v}" for k, v in pairs if k and v)
    return str(value)


class _HTMLText(HTMLParser):
    """The text of an HTML fragment: tags dropped (a block tag leaves a space), entities decoded,
    the content of <script> and <style> left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in ("script", "style")
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self.hidden:
            self.hidden -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def _clean(text: str) -> str:
    """Plain text of a field: HTML reduced to its text, whitespace collapsed."""
    if "<" in text or "&" in text:
        parser = _HTMLText()
        try:
            parser.feed(text)
            parser.close()
            text = "".join(parser.parts)
        except AssertionError:  # html.parser gives up on some broken markup ("<![" not followed by a name)
            text = html.unescape(_TAG.sub(" ", text))
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last space before the limit when there is one."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head[1:] else text[:limit]
    return cut[:limit].rstrip(" ,;:-")
