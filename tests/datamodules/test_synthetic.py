"""Tests of the built-in synthetic data set (datamodules/synthetic.py)."""
import re

import numpy as np
import pandas as pd
import pytest

from twotower.configs.schema import SyntheticConfig
from twotower.datamodules.synthetic import FILLER_WORDS, LATE_START, TIMELINE, TITLE_WORDS, TOPICS, catalogue, generate

SMALL = dict(num_users=300, num_items=400, num_topics=8)


@pytest.fixture(scope="module")
def data():
    cfg = SyntheticConfig(**SMALL, seed=3)
    interactions, items = generate(cfg)
    return cfg, interactions, items, catalogue(cfg)


def _with_catalogue(interactions: pd.DataFrame, cat: pd.DataFrame) -> pd.DataFrame:
    return interactions.merge(cat, on="item_id", how="left", validate="many_to_one")


def _consecutive(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(earlier, later) rows of every pair of consecutive events of one user."""
    same_user = frame["user_id"].to_numpy()[1:] == frame["user_id"].to_numpy()[:-1]
    return frame.iloc[:-1][same_user].reset_index(drop=True), frame.iloc[1:][same_user].reset_index(drop=True)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_same_seed_same_frames_other_seed_differs():
    cfg = SyntheticConfig(num_users=50, num_items=100, num_topics=4, seed=7)
    first, again = generate(cfg), generate(SyntheticConfig(num_users=50, num_items=100, num_topics=4, seed=7))
    pd.testing.assert_frame_equal(first[0], again[0])
    pd.testing.assert_frame_equal(first[1], again[1])
    other = generate(SyntheticConfig(num_users=50, num_items=100, num_topics=4, seed=8))
    assert not first[0].equals(other[0])
    assert not first[1].equals(other[1])


def test_schema_and_ids(data):
    cfg, interactions, items, cat = data
    assert list(interactions.columns) == ["user_id", "item_id", "timestamp"]
    assert list(items.columns) == ["item_id", "title", "text"]
    for column in ("user_id", "item_id"):
        assert pd.api.types.is_string_dtype(interactions[column])
    for column in ("item_id", "title", "text"):
        assert pd.api.types.is_string_dtype(items[column])
    assert interactions["timestamp"].dtype == np.int64
    assert interactions["user_id"].str.fullmatch(r"u\d{5}").all()
    assert items["item_id"].str.fullmatch(r"i\d{5}").all()
    # Every item once (touched or not), every interaction on a catalogue item, every user present.
    assert items["item_id"].is_unique and len(items) == cfg.num_items
    assert set(items["item_id"]) == {f"i{i:05d}" for i in range(1, cfg.num_items + 1)}
    assert set(interactions["item_id"]) <= set(items["item_id"])
    assert interactions["user_id"].nunique() == cfg.num_users
    # The public items frame is the catalogue without its hidden columns.
    pd.testing.assert_frame_equal(items, cat[["item_id", "title", "text"]])
    assert (items["title"].str.len() > 0).all() and (items["text"].str.len() > 0).all()
    assert items["title"].nunique() >= 0.9 * len(items)


def test_sorted_strictly_increasing_no_repeats(data):
    cfg, interactions, _, _ = data
    users = interactions["user_id"].to_numpy()
    times = interactions["timestamp"].to_numpy()
    assert (users[1:] >= users[:-1]).all()
    same_user = users[1:] == users[:-1]
    assert (np.diff(times)[same_user] > 0).all()
    assert times.min() >= 0 and times.max() < TIMELINE
    assert not interactions.duplicated(["user_id", "item_id"]).any()


def test_sequence_lengths(data):
    cfg, interactions, _, _ = data
    lengths = interactions.groupby("user_id").size()
    assert lengths.min() >= cfg.min_events
    assert abs(lengths.mean() - cfg.mean_events) < 0.2 * cfg.mean_events
    assert lengths.max() > 2 * cfg.mean_events  # a long tail, not a constant
    # Users spread over the timeline: the median user spans a good part of it.
    span = interactions.groupby("user_id")["timestamp"].agg(lambda t: t.max() - t.min())
    assert span.median() > 0.2 * TIMELINE


def test_late_items_only_after_release(data):
    cfg, interactions, _, cat = data
    late = cat[cat["release"] > 0]
    assert len(late) == round(cfg.late_item_fraction * cfg.num_items)
    assert (late["release"] >= LATE_START * TIMELINE).all() and (late["release"] < TIMELINE).all()
    joined = _with_catalogue(interactions, cat)
    assert (joined["timestamp"] >= joined["release"]).all()
    on_late = joined[joined["release"] > 0]
    assert len(on_late) > 0 and on_late["item_id"].nunique() >= len(late) // 2
    assert (on_late["timestamp"] >= LATE_START * TIMELINE).all()
    # New releases are popular: some users' last events (the test targets) are late items.
    targets = joined.groupby("user_id").tail(1)
    assert (targets["release"] > 0).mean() > 0.03


def test_consecutive_items_share_their_topic(data):
    _, interactions, _, cat = data
    earlier, later = _consecutive(_with_catalogue(interactions, cat))
    observed = (earlier["topic"].to_numpy() == later["topic"].to_numpy()).mean()
    chance = ((cat["topic"].value_counts() / len(cat)) ** 2).sum()
    assert observed > 3 * chance


def test_recent_events_predict_the_next_topic_better_than_old_ones(data):
    _, interactions, _, cat = data
    joined = _with_catalogue(interactions, cat)
    long = joined[joined.groupby("user_id")["item_id"].transform("size") >= 20]
    topics = long.groupby("user_id")["topic"].agg(list)
    recent = np.mean([t[-1] == t[-2] for t in topics])
    old = np.mean([t[-1] == t[0] for t in topics])
    assert recent > old + 0.1


def test_texts_of_consecutive_items_overlap_more_than_random_pairs(data):
    _, interactions, items, _ = data
    words = {i: _words(f"{title} {text}") for i, title, text in items.itertuples(index=False)}

    def jaccard(a: pd.Series, b: pd.Series) -> float:
        return np.mean([len(words[x] & words[y]) / len(words[x] | words[y]) for x, y in zip(a, b)])

    earlier, later = _consecutive(interactions)
    rng = np.random.default_rng(0)
    random_a, random_b = (interactions["item_id"].to_numpy()[rng.integers(len(interactions), size=len(earlier))]
                          for _ in range(2))
    assert jaccard(earlier["item_id"], later["item_id"]) > 2 * jaccard(random_a, random_b)


def test_texts_are_mostly_but_not_only_topic_words(data):
    _, _, items, cat = data
    topic_words = list(TOPICS.values())
    text_shares, title_shares = [], []
    for text, title, topic in zip(items["text"], items["title"], cat["topic"]):
        own = set(topic_words[topic])
        tokens = re.findall(r"[a-z]+", text.lower())
        assert 8 <= len(tokens) <= 15
        text_shares.append(np.mean([w in own for w in tokens]))
        title_tokens = [w for w in re.findall(r"[a-z]+", title.lower()) if w not in TITLE_WORDS]
        assert 2 <= len(title_tokens) <= 3
        title_shares.append(np.mean([w in own for w in title_tokens]))
    assert 0.65 < np.mean(text_shares) < 0.85  # informative, yet noisy
    assert min(text_shares) < 1.0
    assert np.mean(title_shares) == 1.0


def test_zipf_popularity_within_topics(data):
    _, interactions, _, cat = data
    counts = interactions["item_id"].value_counts()
    early = cat[cat["release"] == 0].assign(count=lambda c: c["item_id"].map(counts).fillna(0))
    top, median = [], []
    for _, group in early.groupby("topic"):
        ordered = group.sort_values("popularity", ascending=False)["count"].to_numpy()
        top.append(ordered[0])
        median.append(ordered[len(ordered) // 2])
    assert np.sum(top) > 2 * np.sum(median)
    assert np.mean(np.array(top) > np.array(median)) >= 0.75
    # More popular items get more interactions: rank correlation within topics.
    ranks = early.groupby("topic")[["popularity", "count"]].rank()
    assert np.corrcoef(ranks["popularity"], ranks["count"])[0, 1] > 0.5


def test_too_many_topics_is_a_clear_error():
    with pytest.raises(ValueError, match=rf"num_topics.*at most {len(TOPICS)}"):
        generate(SyntheticConfig(num_topics=len(TOPICS) + 1))


def test_topic_table():
    sizes = {len(words) for words in TOPICS.values()}
    assert len(TOPICS) >= 24 and len(sizes) == 1 and 12 <= sizes.pop() <= 16
    every = [w for words in TOPICS.values() for w in words]
    assert len(every) == len(set(every))  # a word names one topic only
    assert not set(every) & (set(FILLER_WORDS) | set(TITLE_WORDS))
    assert all(re.fullmatch(r"[a-z]+", w) for w in every + list(FILLER_WORDS) + list(TITLE_WORDS))


def test_fewer_items_than_topics_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_items=3.*num_topics=4"):
        generate(SyntheticConfig(num_items=3, num_topics=4))


def test_stray_events_are_labelled_skip_and_leave_the_users_topics(data):
    cfg, plain, _, cat = data
    assert "event" not in plain.columns  # no strays, no event column
    interactions, _ = generate(SyntheticConfig(**SMALL, seed=3, stray_fraction=0.3))
    events = interactions["event"].to_numpy()
    assert set(events) == {"view", "skip"}
    n = len(events)
    assert abs((events == "skip").mean() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # binomial, 4 sigma
    # A view shares the topic of the user's previous view far more often than a skip does, which
    # is no likelier to than two random items are.
    frame = _with_catalogue(interactions, cat)
    earlier, later = _consecutive(frame)
    after_view = earlier["event"].to_numpy() == "view"
    same = earlier["topic"].to_numpy() == later["topic"].to_numpy()
    view_rate, skip_rate = same[after_view & (later["event"] == "view")].mean(), same[after_view & (later["event"] == "skip")].mean()
    chance = ((cat["topic"].value_counts() / len(cat)) ** 2).sum()
    assert view_rate > 3 * chance and skip_rate < 2 * chance, (view_rate, skip_rate, chance)
