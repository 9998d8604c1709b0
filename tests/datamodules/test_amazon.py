"""Tests of twotower.datamodules.amazon: both releases of the Amazon Reviews JSON Lines, plain and gzipped,
text cleaning, the metadata policies, every bad-input error, skip mode, and `twotower prepare`.

Every fixture file is written here, in tmp_path, with the fields of the published files: the 2018
release (McAuley lab, "Amazon Review Data 2018": reviewerID/asin/overall/unixReviewTime; metadata
asin/title/brand/category/feature/description/main_cat/details) and the 2023 release ("Amazon
Reviews 2023": user_id/parent_asin/rating/timestamp in ms; metadata parent_asin/title/store/
categories/features/description/main_category/details).
"""
from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest

from twotower.configs import load_config
from twotower.configs.loader import ConfigError
from twotower.datamodules.amazon import FIELD_CHARS, _clean, read_amazon
from twotower.datamodules.prepare import load_raw

from helpers import raises, twotower

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["item_id", *FIELD_CHARS, "line"]


def write(path: Path, lines: list, gz: bool = False) -> Path:
    """One line per entry: a dict as JSON, a str as written, bytes as they are."""
    data = b"".join((line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
                    for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def review23(user: str, item: str, ms: int, rating: float = 5.0) -> dict:
    return {"rating": rating, "title": "Nice", "text": "Works <br />well", "images": [], "asin": item + "-red",
            "parent_asin": item, "user_id": user, "timestamp": ms, "helpful_vote": 0, "verified_purchase": True}


def meta23(item: str, title: str, **fields) -> dict:
    return {"main_category": "All Beauty", "title": title, "average_rating": 4.3, "rating_number": 10, "features": [],
            "description": [], "price": None, "images": [], "videos": [], "store": None, "categories": [], "details": {},
            "parent_asin": item, "bought_together": None, **fields}


def review18(user: str, item: str, seconds: int, rating: float = 5.0) -> dict:
    return {"overall": rating, "vote": "2", "verified": True, "reviewTime": "01 1, 2018", "reviewerID": user, "asin": item,
            "style": {"Size:": "Large"}, "reviewerName": "Abbey", "reviewText": "Comfy", "summary": "Good",
            "unixReviewTime": seconds}


def meta18(item: str, title: str, **fields) -> dict:
    return {"category": [], "tech1": "", "description": [], "fit": "", "title": title, "also_buy": [], "brand": "",
            "feature": [], "rank": [], "also_view": [], "details": {}, "main_cat": "Beauty", "similar_item": "",
            "date": "", "price": "", "asin": item, "imageURL": [], "imageURLHighRes": [], **fields}


REVIEWS_2023 = [
    review23("U1", "P1", 1_588_687_728_923, 5.0),
    review23("U1", "P2", 1_588_687_730_000, 4.0),
    review23("U2", "P1", 1_600_000_000_500, 3.0),
]
META_2023 = [
    meta23("P1", "Sea <b>Salt</b> Spray &amp; Mist", store="Herbivore", categories=["Beauty", "Hair Care", "Sprays"],
           features=["Vegan.", "8 oz", ""], description=["<p>Bottled sea breeze.</p><script>var x = 1;</script>", "For <i>all</i> hair"],
           details={"Brand": "Herbivore", "Item Weight": "8 ounces"}),
    meta23("P7", "Never reviewed"),
    meta23("P2", "Comb", details={"Brand": "Acme"}),
    meta23("P2", "Comb", details={"Brand": "Acme"}),  # the same row again
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_2023_release(tmp_path, gz):
    suffix = ".jsonl.gz" if gz else ".jsonl"
    interactions, items, counts = read_amazon(write(tmp_path / f"Beauty{suffix}", REVIEWS_2023, gz),
                                              write(tmp_path / f"meta_Beauty{suffix}", META_2023, gz))
    assert counts == {"unreviewed_item": 1, "duplicate_metadata": 1}
    assert interactions["user_id"].tolist() == ["U1", "U1", "U2"]
    assert interactions["item_id"].tolist() == ["P1", "P2", "P1"]  # parent_asin, not asin
    assert interactions["timestamp"].tolist() == [1_588_687_728.923, 1_588_687_730.0, 1_600_000_000.5]  # ms -> s
    assert interactions["rating"].tolist() == [5.0, 4.0, 3.0] and interactions["line"].tolist() == [1, 2, 3]

    assert list(items.columns) == COLUMNS
    assert items["item_id"].tolist() == ["P1", "P2"] and items["line"].tolist() == [1, 3]
    p1, p2 = items.iloc[0], items.iloc[1]
    assert p1["title"] == "Sea Salt Spray & Mist"  # tags dropped, entities decoded
    assert p1["brand"] == "Herbivore" and p2["brand"] == "Acme"  # store, else details["Brand"]
    assert p1["categories"] == "Beauty > Hair Care > Sprays"
    assert p1["features"] == "Vegan. 8 oz"
    assert p1["description"] == "Bottled sea breeze. For all hair"  # no script, one space per block
    assert p1["main_category"] == "All Beauty"
    assert p1["details"] == "Brand: Herbivore, Item Weight: 8 ounces"
    assert p2["categories"] == "" and p2["description"] == ""


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_2018_release_and_the_2014_python_literal_metadata(tmp_path, gz):
    reviews = [review18("A1", "0001", 1_514_764_800, 5.0), review18("A2", "0002", 1_252_800_000, 2.0),
               {**review18("A2", "0001", 0), "unixReviewTime": None, "reviewTime": "09 13, 2009"}]
    meta = [
        meta18("0001", "Heavenly Hymns", brand="Word Music", category=["Books", "Music", "</span></span>", "Hymns"],
               feature=["Large print"], main_cat='<img src="x.png" alt="Books"/>',
               description=['<div class="a-section"><b>Features:</b><br>Spiral bound &amp; durable<br/>Hardcover</div>']),
        # The 2014 metadata: a Python literal (single quotes), categories as a list of paths, description a string.
        str({"asin": "0002", "title": "Blue Shirt", "brand": "Acme", "description": "A <em>soft</em> shirt",
             "categories": [["Clothing", "Men", "Shirts"], ["Clothing", "Sale"]]}),
    ]
    interactions, items, counts = read_amazon(write(tmp_path / "Books.json.gz", reviews, gz),
                                              write(tmp_path / "meta_Books.json", meta, gz))  # the name says nothing
    assert counts == {}
    assert interactions[["user_id", "item_id", "rating"]].values.tolist() == [["A1", "0001", 5.0], ["A2", "0002", 2.0], ["A2", "0001", 5.0]]
    assert interactions["timestamp"].tolist() == [1_514_764_800.0, 1_252_800_000.0, 1_252_800_000.0]  # reviewTime when no unix time
    assert list(items.columns) == COLUMNS and items["item_id"].tolist() == ["0001", "0002"]
    hymns, shirt = items.iloc[0], items.iloc[1]
    assert hymns["brand"] == "Word Music" and hymns["categories"] == "Books > Music > Hymns"  # HTML-only entries dropped
    assert hymns["description"] == "Features: Spiral bound & durable Hardcover" and hymns["features"] == "Large print"
    assert hymns["main_category"] == ""  # only an <img> tag
    assert shirt["categories"] == "Clothing > Men > Shirts, Clothing > Sale" and shirt["description"] == "A soft shirt"


@pytest.mark.parametrize(("html", "text"), [
    ("<ul><li>One</li><li>Two &gt; three</li></ul>", "One Two > three"),
    ("Cozy<br>warm<style>.a{color:red}</style>!", "Cozy warm!"),
    ("AT&T 5 < 6 &nbsp;ok", "AT&T 5 < 6 ok"),
    ("Soft <![!bad]]> cotton &amp; silk", "Soft cotton & silk"),  # html.parser gives up here: a regex takes over
])
def test_html_is_reduced_to_text(html, text):
    assert _clean(html) == text


def test_long_fields_are_cut_at_a_word_boundary(tmp_path):
    words = " ".join(f"word{i}" for i in range(400))
    reviews = write(tmp_path / "r.jsonl", [review23("U1", "P1", 1000)])
    meta = write(tmp_path / "m.jsonl", [meta23("P1", words, description=[words, words], features=["x" * 5000])])
    _, items, _ = read_amazon(reviews, meta)
    for field in ("title", "description", "features"):
        text = items.at[0, field]
        assert len(text) <= FIELD_CHARS[field], field
    assert words.startswith(items.at[0, "title"]) and words[len(items.at[0, "title"])] == " "  # whole words only
    assert items.at[0, "features"] == "x" * FIELD_CHARS["features"]  # one long word: a hard cut


# ---------------------------------------------------------------------------------------------
# Bad input


def files(tmp_path: Path, reviews: list, meta: list, gz: bool = False) -> tuple[Path, Path]:
    return write(tmp_path / "reviews.jsonl", reviews, gz), write(tmp_path / "meta.jsonl", meta, gz)


@pytest.mark.parametrize(
    ("reviews", "meta", "words"),
    [
        (REVIEWS_2023[:1] + ['{"user_id": "U3", "parent_asin": '], META_2023, ["reviews.jsonl, line 2", "not valid JSON"]),
        (REVIEWS_2023[:1] + ["[1, 2]"], META_2023, ["reviews.jsonl, line 2", "not a JSON object"]),
        (REVIEWS_2023[:1] + [{"who": "U3", "what": "P1"}], META_2023,
         ["reviews.jsonl, line 2", "neither a 2018 nor a 2023 Amazon review", "reviewerID", "its fields are: who, what"]),
        (REVIEWS_2023[:1] + [review18("A1", "P1", 1)], META_2023,
         ["reviews.jsonl, line 2", "a 2018-release review, but the reviews are of the 2023 release"]),
        (["", {"who": 1}], META_2023, ["reviews.jsonl, line 2", "neither a 2018 nor a 2023"]),
        (REVIEWS_2023[:1] + [{**review23("U3", "P1", 1), "timestamp": "later"}], META_2023,
         ["reviews.jsonl, line 2", "'timestamp'", "'later' is not a number"]),
        (REVIEWS_2023[:1] + [{**review23("U3", "P1", 1), "rating": "five"}], META_2023, ["line 2", "'rating': 'five' is not a number"]),
        (REVIEWS_2023[:1] + [review23("", "P1", 1)], META_2023, ["line 2", "empty user id"]),
        (REVIEWS_2023[:1] + [b'{"user_id": "caf\xe9"}'], META_2023, ["reviews.jsonl, line 2", "not valid UTF-8", "0xe9"]),
        (["", "  "], META_2023, ["reviews.jsonl", "empty file"]),
        (REVIEWS_2023, META_2023[:2] + ['{"parent_asin": "P2", "title": '], ["meta.jsonl, line 3", "not valid JSON"]),
        (REVIEWS_2023, [{"parent_asin": None}] + META_2023, ["meta.jsonl, line 1", "'parent_asin': empty item id"]),
        (REVIEWS_2023, META_2023 + [meta23("P1", "Another title")],
         ["meta.jsonl, line 5", "duplicate item id 'P1' with different metadata (first on line 1)"]),
        (REVIEWS_2023, [meta18("P1", "Old")], ["meta.jsonl, line 1", "metadata of the 2018 release", "reviews.jsonl", "2023 release"]),
        (REVIEWS_2023, [meta23("P5", "Unreviewed")], ["meta.jsonl", "no metadata row for any item of the reviews"]),
    ],
)
def test_bad_input_names_file_line_and_problem(tmp_path, reviews, meta, words):
    raises(lambda: read_amazon(*files(tmp_path, reviews, meta)), *words)


def test_file_level_errors(tmp_path):
    reviews, meta = files(tmp_path, REVIEWS_2023, META_2023)
    raises(lambda: read_amazon(tmp_path / "nope.jsonl", meta), "nope.jsonl", "file not found")
    raises(lambda: read_amazon(reviews, tmp_path / "nope.jsonl"), "nope.jsonl", "file not found")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in REVIEWS_2023 * 50) + "\n").encode())[:-30])
    raises(lambda: read_amazon(truncated, meta), "cut.jsonl.gz", "cannot read the file after line")


def test_unknown_items_and_the_catalogue_through_load_raw(tmp_path):
    reviews, meta = files(tmp_path, REVIEWS_2023 + [review23("U2", "P9", 1_600_000_001_000)], META_2023, gz=True)
    overrides = ["data.source=amazon", f"data.reviews={reviews}", f"data.metadata={meta}", "data.text_fields=[title,brand]"]
    raises(lambda: load_raw(load_config([], overrides).data), "reviews.jsonl, line 4", "unknown item id 'P9'", "meta.jsonl")
    interactions, items, skipped = load_raw(load_config([], overrides + ["data.on_bad_row=skip"]).data)
    assert skipped == {"unknown_item": 1, "unreviewed_item": 1, "duplicate_metadata": 1}
    assert interactions["item_id"].tolist() == ["P1", "P2", "P1"] and items["item_id"].tolist() == ["P1", "P2"]
    raises(lambda: load_raw(load_config([], overrides[:-1]).data), "meta.jsonl", "text field(s) ['text']", "brand, categories")


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    reviews = [
        review23("U1", "P1", 1000),  # 1: good
        '{"user_id": ',  # 2: not JSON
        {"who": "U3"},  # 3: neither release
        review18("A1", "P1", 1),  # 4: the other release
        b'{"user_id": "caf\xe9"}',  # 5: not UTF-8
        {**review23("U2", "P2", 2000), "timestamp": None},  # 6: no time
        "",  # 7: blank
        review23("U2", "P2", 3000),  # 8: good
    ]
    meta = [meta23("P1", "One"), meta23("P1", "Another"), "{oops", {"parent_asin": ""}, meta18("X", "2018"), meta23("P2", "Two")]
    interactions, items, counts = read_amazon(*files(tmp_path, reviews, meta), on_bad_row="skip")
    assert counts == {"unparsable_row": 5, "non_utf8": 1, "bad_timestamp": 1, "duplicate_item_id": 1, "empty_item_id": 1}
    assert interactions["line"].tolist() == [1, 8] and interactions["user_id"].tolist() == ["U1", "U2"]
    assert items["title"].tolist() == ["One", "Two"] and items["line"].tolist() == [1, 6]  # the first duplicate kept
    raises(lambda: read_amazon(*files(tmp_path, ["{", "[]"], META_2023), on_bad_row="skip"),
           "reviews.jsonl", "every row was bad", "unparsable_row: 2")


def test_config_needs_both_files():
    with pytest.raises(ConfigError, match="data.reviews and data.metadata"):
        load_config([], ["data.source=amazon", "data.reviews=r.jsonl"])


# ---------------------------------------------------------------------------------------------
# End to end


def test_prepare_on_the_2023_release(tiny_overrides, tmp_path):
    """`twotower prepare -c configs/data/amazon.yaml` on a small gzipped 2023 category."""
    products = ["Shampoo", "Conditioner", "Hair Spray", "Comb", "Brush", "Dryer"]
    reviews = [review23(f"U{u}", f"P{(u + k) % 6}", 1_600_000_000_000 + 1000 * (u * 10 + k)) for u in range(8) for k in range(4)]
    reviews.append(review23("U0", "P_GONE", 1_700_000_000_000))  # no metadata: skipped (the YAML says skip)
    meta = [meta23(f"P{i}", f"{name} <b>Pro</b>", store="Acme", categories=["Beauty", "Hair Care"],
                   description=["<p>Made for <i>all</i> hair.</p>"]) for i, name in enumerate(products)]
    folder = tmp_path / "amazon-2023"
    folder.mkdir()
    write(folder / "Hair.jsonl.gz", reviews, gz=True)
    write(folder / "meta_Hair.jsonl.gz", meta + [meta23("P_UNSOLD", "Unsold")], gz=True)
    result = twotower("prepare", "-c", str(REPO / "configs" / "data" / "amazon.yaml"), *tiny_overrides,
                      f"data.path={folder}", "data.name=Hair", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["source"] == "amazon"
    assert manifest["counts"]["items"] == 6 and manifest["counts"]["users"] == 8 and manifest["counts"]["test"] == 8
    assert manifest["skipped"] == {"unknown_item": 1, "unreviewed_item": 1}
    assert manifest["text_fields"] == ["title", "brand", "categories", "features", "description"]
    assert json.loads((tmp_path / "data" / "item_ids.json").read_text()) == [f"P{i}" for i in range(6)]
    with tarfile.open(tmp_path / "data" / manifest["shards"]["items"][0]) as tar:
        first = tar.extractfile(sorted(n for n in tar.getnames() if n.endswith(".txt"))[0]).read().decode()
    assert first == "title: Shampoo Pro; brand: Acme; categories: Beauty > Hair Care; description: Made for all hair."
