"""The built-in synthetic data set: users with drifting interests over topic-labelled items.

Every item has one main topic out of a hand-written table of real English topic words, and its title
and description are drawn mostly from that topic's words (plus some filler and words of other
topics), so a pretrained text encoder can tell which items belong together. Users follow a few topics
at a time, an interest is now and then replaced by another topic (so recent events matter most), and
each event picks a topic by the user's interest weights, then an item of that topic by its Zipf
popularity among the items released by then that the user has not touched yet. A share of the items
are late releases that exist only in the last part of the timeline, so some test targets are new items
that a model trained on item ids has barely or never seen. With `stray_fraction`, that share of the
events picks a random topic instead (an accidental click), and an `event` column tells them apart
(`skip`, else `view`): an action that says which history items to discount.

`catalogue(cfg)` gives the items with their hidden topic, release time and popularity weight;
`generate(cfg)` gives what a data set would ship: the interactions and the items' texts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twotower.configs.schema import SyntheticConfig

TOPICS: dict[str, tuple[str, ...]] = {
    "astronomy": ("galaxy", "telescope", "orbit", "nebula", "planet", "comet", "asteroid", "constellation",
                  "eclipse", "meteor", "supernova", "cosmos", "satellite", "lunar", "stargazing"),
    "cooking": ("recipe", "oven", "garlic", "skillet", "simmer", "spice", "dough", "saute", "broth", "herbs",
                "roast", "kitchen", "onion", "baking", "chef"),
    "football": ("goalkeeper", "striker", "penalty", "stadium", "referee", "midfield", "tackle", "league",
                 "offside", "kickoff", "goal", "defender", "header", "cleats", "soccer"),
    "gardening": ("seedling", "compost", "soil", "pruning", "greenhouse", "mulch", "fertilizer", "tulip",
                  "shovel", "weeds", "harvest", "perennial", "watering", "trowel", "orchard"),
    "jazz": ("saxophone", "trumpet", "improvisation", "swing", "bebop", "trombone", "bassist", "quartet",
             "rhythm", "blues", "jam", "melody", "chord", "ballad", "nightclub"),
    "sailing": ("sailboat", "mast", "harbor", "anchor", "keel", "rudder", "regatta", "yacht", "nautical",
                "deck", "tide", "mooring", "hull", "marina", "breeze"),
    "chess": ("checkmate", "bishop", "knight", "pawn", "rook", "gambit", "endgame", "grandmaster", "opening",
              "castling", "queen", "stalemate", "chessboard", "blitz", "tournament"),
    "photography": ("camera", "lens", "shutter", "aperture", "tripod", "exposure", "portrait", "zoom", "flash",
                    "darkroom", "pixel", "focus", "snapshot", "photographer", "landscape"),
    "hiking": ("trail", "backpack", "summit", "boots", "compass", "canyon", "ridge", "campsite", "trekking",
               "wilderness", "map", "waterfall", "hiker", "altitude", "footpath"),
    "knitting": ("yarn", "needles", "wool", "stitch", "scarf", "sweater", "crochet", "knit", "pattern",
                 "cardigan", "mittens", "cotton", "purl", "quilt", "beanie"),
    "cycling": ("bicycle", "pedal", "helmet", "derailleur", "saddle", "handlebar", "peloton", "sprint", "gears",
                "spokes", "tire", "cyclist", "chain", "velodrome", "bike"),
    "coffee": ("espresso", "barista", "latte", "cappuccino", "beans", "grinder", "brew", "mug", "caffeine",
               "arabica", "crema", "cafe", "filter", "kettle", "aroma"),
    "wine": ("vineyard", "grape", "cellar", "sommelier", "vintage", "merlot", "cork", "tasting", "barrel",
             "chardonnay", "winery", "bottle", "decanter", "terroir", "riesling"),
    "birdwatching": ("binoculars", "sparrow", "feathers", "nest", "migration", "warbler", "owl", "hawk",
                     "songbird", "heron", "birdsong", "plumage", "wingspan", "finch", "ornithology"),
    "painting": ("canvas", "brush", "palette", "watercolor", "easel", "acrylic", "sketch", "pigment", "gallery",
                 "mural", "oil", "impressionist", "studio", "stroke", "artist"),
    "history": ("empire", "dynasty", "medieval", "castle", "emperor", "archive", "revolution", "ancient",
                "battle", "kingdom", "pharaoh", "treaty", "monarch", "chronicle", "crusade"),
    "programming": ("code", "compiler", "python", "debugging", "algorithm", "software", "function", "database",
                    "keyboard", "developer", "syntax", "variable", "server", "script", "repository"),
    "fitness": ("workout", "dumbbell", "treadmill", "cardio", "squat", "protein", "gym", "muscle", "stretching",
                "barbell", "sweat", "trainer", "pushup", "endurance", "yoga"),
    "pets": ("puppy", "kitten", "leash", "collar", "veterinarian", "kibble", "aquarium", "hamster", "grooming",
             "litter", "paws", "fetch", "parrot", "treats", "kennel"),
    "ocean": ("coral", "reef", "whale", "dolphin", "plankton", "shark", "jellyfish", "octopus", "seaweed",
              "scuba", "snorkel", "lagoon", "turtle", "oyster", "seashell"),
    "cars": ("engine", "turbo", "sedan", "horsepower", "garage", "transmission", "mechanic", "exhaust", "piston",
             "convertible", "motor", "brakes", "highway", "dashboard", "gasoline"),
    "medicine": ("doctor", "hospital", "surgery", "vaccine", "nurse", "diagnosis", "clinic", "patient",
                 "prescription", "symptom", "therapy", "pharmacy", "stethoscope", "fever", "medicine"),
    "weather": ("storm", "thunder", "rain", "forecast", "hurricane", "tornado", "cloud", "humidity", "lightning",
                "snowfall", "drizzle", "barometer", "climate", "blizzard", "meteorologist"),
    "geology": ("fossil", "volcano", "mineral", "crystal", "granite", "lava", "quartz", "erosion", "tectonic",
                "geology", "boulder", "magma", "sediment", "earthquake", "basalt"),
}
"Topic name -> its words (the same number for every topic). `num_topics` uses the first ones."

TITLE_WORDS = ("guide", "collection", "deluxe", "essentials", "handbook", "companion", "basics", "classics",
               "edition", "series", "kit", "digest")
"Generic words a title may end with."
FILLER_WORDS = ("classic", "modern", "simple", "popular", "complete", "practical", "everyday", "premium",
                "friendly", "original", "great", "useful", "family", "beginner", "advanced", "quality")
"Topic-free words mixed into descriptions."

TIMELINE = 100 * 86400
"Length of the timeline in seconds; every timestamp lies in [0, TIMELINE)."
LATE_START = 0.8
"Late items are released uniformly in [LATE_START * TIMELINE, TIMELINE)."
NEW_RELEASE_BOOST = 5.0
"A late item's Zipf weight is multiplied by this: new releases are popular once out."
TEXT_NOISE = 0.25
"Chance that a description word is filler or a word of another topic instead of one of the item's topic."
MAX_REDRAWS = 100
"Rounds of redrawing events whose item was taken already (or whose topics have no item out yet)."


def catalogue(cfg: SyntheticConfig) -> pd.DataFrame:
    """The items: item_id, title, text, and the hidden topic (index into TOPICS), release (seconds,
    0 unless late) and popularity (Zipf weight within the topic, boosted for late items)."""
    if cfg.num_topics > len(TOPICS):
        raise ValueError(f"data.synthetic.num_topics={cfg.num_topics}: the built-in topic table has "
                         f"{len(TOPICS)} topics, so at most {len(TOPICS)}")
    if cfg.num_items < cfg.num_topics:
        raise ValueError(f"data.synthetic.num_items={cfg.num_items}: expected at least data.synthetic.num_topics="
                         f"{cfg.num_topics} (every topic needs items)")
    rng = np.random.default_rng(cfg.seed).spawn(2)[0]
    n = cfg.num_items
    topic = rng.permutation(np.arange(n) % cfg.num_topics)  # balanced topic sizes
    release = np.zeros(n, dtype=np.int64)
    late = rng.choice(n, size=round(cfg.late_item_fraction * n), replace=False)
    release[late] = rng.integers(int(LATE_START * TIMELINE), TIMELINE, size=late.size)

    by_topic = np.lexsort((rng.random(n), topic))  # a random popularity order within each topic
    rank = np.empty(n, dtype=np.int64)
    rank[by_topic] = np.arange(n) - np.searchsorted(topic[by_topic], topic[by_topic])
    popularity = (rank + 1.0) ** -cfg.zipf_exponent
    popularity[late] *= NEW_RELEASE_BOOST

    titles, texts = _texts(rng, topic)
    width = max(5, len(str(n)))
    return pd.DataFrame({
        "item_id": [f"i{i:0{width}d}" for i in range(1, n + 1)],
        "title": titles, "text": texts, "topic": topic, "release": release, "popularity": popularity,
    })


def generate(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (interactions, items).

    interactions: user_id, item_id, timestamp (int64 seconds in [0, TIMELINE)), sorted by user then
    time, a user's timestamps strictly increasing, no (user, item) pair twice. items: item_id, title,
    text of every item of the catalogue. An event that finds no untouched released item in its user's
    topics within MAX_REDRAWS redraws is skipped: about 0.1 % of them at the defaults, more in tiny
    catalogues (a handful of items per topic), where a user can then end below `min_events`."""
    items = catalogue(cfg)
    rng = np.random.default_rng(cfg.seed).spawn(2)[1]
    extra = max(cfg.mean_events - cfg.min_events, 0.0)
    lengths = cfg.min_events + rng.geometric(1.0 / (1.0 + extra), size=cfg.num_users) - 1  # extra on average
    lengths = np.minimum(lengths, cfg.num_items)  # a user touches an item at most once
    user = np.repeat(np.arange(cfg.num_users), lengths)
    time = _timestamps(rng, lengths)
    interests, weights = _interests(rng, cfg, lengths)
    stray = np.zeros(user.size, dtype=bool)
    if cfg.stray_fraction > 0:  # from a stream of its own: without strays, a seed gives the data it always gave
        stray_rng = np.random.default_rng(cfg.seed).spawn(3)[2]
        stray = stray_rng.random(user.size) < cfg.stray_fraction
        interests[stray] = stray_rng.integers(cfg.num_topics, size=(int(stray.sum()), 1))
    item = _items(rng, items, user, time, interests, weights)
    width = max(5, len(str(cfg.num_users)))
    user_ids = np.array([f"u{u:0{width}d}" for u in range(1, cfg.num_users + 1)])
    kept = item >= 0
    interactions = pd.DataFrame({"user_id": user_ids[user[kept]], "item_id": items["item_id"].to_numpy()[item[kept]],
                                 "timestamp": time[kept]})
    if cfg.stray_fraction > 0:
        interactions["event"] = np.where(stray[kept], "skip", "view")
    return interactions, items[["item_id", "title", "text"]].copy()


def _texts(rng: np.random.Generator, topic: np.ndarray) -> tuple[list[str], list[str]]:
    """Titles of 2-3 topic words plus, half the time, a generic word; descriptions of 8-15 words,
    each one of the topic's words (no repeats) or, with chance TEXT_NOISE, filler or another topic's word."""
    words = np.array(list(TOPICS.values()))  # (topics, words per topic)
    n, (num_all, per_topic) = topic.size, words.shape
    own = words[topic[:, None], np.argsort(rng.random((n, per_topic)), axis=1)]  # each row: a shuffle
    other = (topic[:, None] + rng.integers(1, num_all, size=(n, per_topic))) % num_all
    noise = np.where(rng.random((n, per_topic)) < 0.5,
                     np.array(FILLER_WORDS)[rng.integers(len(FILLER_WORDS), size=(n, per_topic))],
                     words[other, rng.integers(per_topic, size=(n, per_topic))])
    desc = np.where(rng.random((n, per_topic)) < TEXT_NOISE, noise, own)
    title_len = rng.integers(2, 4, size=n)
    suffix = np.where(rng.random(n) < 0.5, np.array(TITLE_WORDS)[rng.integers(len(TITLE_WORDS), size=n)], "")
    # The title takes the shuffle's last words, so it does not just repeat the description's start.
    titles = [" ".join([*own[i, -title_len[i]:], suffix[i]]).strip().title() for i in range(n)]
    text_len = rng.integers(8, 16, size=n)
    texts = [" ".join(desc[i, :text_len[i]]).capitalize() + "." for i in range(n)]
    return titles, texts


def _timestamps(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Each user is active over a random 25-90 % stretch of the timeline, events at exponential gaps."""
    span = rng.uniform(0.25, 0.9, size=lengths.size) * TIMELINE
    start = rng.uniform(size=lengths.size) * (TIMELINE - span - lengths)
    first, last = np.cumsum(lengths) - lengths, np.cumsum(lengths) - 1  # per user
    gaps = rng.exponential(size=lengths.sum())
    clock = np.cumsum(gaps) - gaps  # summed over all users; each user's own clock starts at clock[first]
    frac = (clock - np.repeat(clock[first], lengths)) / np.repeat(clock[last] + gaps[last] - clock[first], lengths)
    position = np.arange(lengths.sum()) - np.repeat(first, lengths)
    # frac is in [0, 1); + position puts at least a second between a user's events (strictly increasing).
    return (np.repeat(start, lengths) + np.repeat(span, lengths) * frac).astype(np.int64) + position


def _interests(rng: np.random.Generator, cfg: SyntheticConfig, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each event's interest topics (events, interests_per_user) and each user's interest weights
    (users, interests_per_user). Before each event, with chance `drift`, one interest is replaced by
    a topic the user does not follow yet."""
    k, num_topics = cfg.interests_per_user, cfg.num_topics
    current = np.argsort(rng.random((lengths.size, num_topics)), axis=1)[:, :k]
    weights = rng.dirichlet(np.ones(k), size=lengths.size)
    interests = np.empty((lengths.sum(), k), dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    for position in range(lengths.max(initial=0)):
        active = np.flatnonzero(lengths > position)
        if num_topics > k:
            drifting = active[rng.random(active.size) < cfg.drift]
            new = rng.integers(num_topics - k, size=drifting.size)
            for followed in np.sort(current[drifting], axis=1).T:  # the new-th topic not followed
                new += new >= followed
            current[drifting, rng.integers(k, size=drifting.size)] = new
        interests[first[active] + position] = current[active]
    return interests, weights


def _items(rng: np.random.Generator, items: pd.DataFrame, user: np.ndarray, time: np.ndarray,
           interests: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each event's item index (-1: dropped): a topic by interest weight, then an item of that topic by
    popularity among those released by the event's time. An event whose item the user had touched
    earlier (or whose topic had nothing out yet) is redrawn, up to MAX_REDRAWS times, then dropped."""
    topic, release, popularity = (items[c].to_numpy() for c in ("topic", "release", "popularity"))
    # Items laid out by topic, then release (items out from the start first): the items of topic t
    # out at time s are the run layout[start[t]:end], end = searchsorted(key, t * TIMELINE + s, "right").
    layout = np.lexsort((release, topic))
    cum = np.concatenate([[0.0], np.cumsum(popularity[layout])])
    key = topic[layout] * TIMELINE + release[layout]
    start = np.searchsorted(key, np.arange(len(TOPICS)) * TIMELINE)  # also for topics without items
    cumw = np.cumsum(weights, axis=1)
    bounds = np.searchsorted(user, np.arange(weights.shape[0] + 1))  # user u's events: bounds[u]:bounds[u + 1]

    chosen = np.full(user.size, -1)
    redraw = np.arange(user.size)
    for _ in range(MAX_REDRAWS):
        slot = np.minimum((rng.random(redraw.size)[:, None] >= cumw[user[redraw]]).sum(axis=1), cumw.shape[1] - 1)
        t = interests[redraw, slot]
        lo, hi = start[t], np.searchsorted(key, t * TIMELINE + time[redraw], side="right")
        mass = cum[lo] + rng.random(redraw.size) * (cum[hi] - cum[lo])
        pos = np.clip(np.searchsorted(cum, mass, side="right") - 1, lo, hi - 1)
        chosen[redraw] = np.where(hi > lo, layout[pos], -1)
        # Recheck the users just redrawn: any later repeat of an item of theirs is redrawn.
        concerned = np.unique(user[redraw])
        counts = bounds[concerned + 1] - bounds[concerned]
        events = np.repeat(bounds[concerned] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        pairs = user[events] * (len(topic) + 1) + chosen[events] + 1  # a dropped event: (user, 0)
        order = np.argsort(pairs, kind="stable")
        repeat = np.zeros(events.size, dtype=bool)
        repeat[order[1:]] = pairs[order[1:]] == pairs[order[:-1]]
        redraw = events[repeat | (chosen[events] < 0)]
        if redraw.size == 0:
            break
    chosen[redraw] = -1
    return chosen


def write_time_split(cfg: SyntheticConfig, cut: float, folder: Path) -> dict[str, str]:
    """The built-in data as CSV files split in time, as a live system sees it: `early` (events before
    `cut`) with `early_items` (only the items those events touch), and `late` (the rest) with
    `all_items` (the whole catalogue, so items first touched after the cut are new). For
    `prepare` then `prepare --append` with `data.source=table`; returns the four paths by name."""
    interactions, items = generate(cfg)
    early = interactions[interactions["timestamp"] < cut]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: str(folder / f"{name}.csv") for name in ("early", "late", "early_items", "all_items")}
    early.to_csv(paths["early"], index=False)
    interactions[interactions["timestamp"] >= cut].to_csv(paths["late"], index=False)
    items[items["item_id"].isin(early["item_id"])].to_csv(paths["early_items"], index=False)
    items.to_csv(paths["all_items"], index=False)
    return paths
