"""`twotower recommend`: top-K for one history (`--history a,b,c`) or many (`--json FILE`) from an
exported model; the command line prints them as JSON lines, one per history, in input order. In a JSON history an item
may be `{"item_id": ..., "timestamp": ..., "action": ...}`, as `POST /recommend` takes it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from twotower.configs import Config
from twotower.serving.export_format import load_exported
from twotower.serving.recommender import Recommender, UnknownItemsError, split_events

log = logging.getLogger(__name__)


def read_histories(history: str | None, json_file: str | None) -> list[list[str | dict]]:
    """`a,b,c` (oldest first) or a JSON file holding a list of such lists of ids (or event objects)."""
    if history is not None:
        return [[i.strip() for i in history.split(",") if i.strip()]]
    try:
        histories = json.loads(Path(json_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_file}: cannot read a JSON list of histories: {exc}") from None
    if not isinstance(histories, list) or not all(isinstance(h, list) for h in histories):
        raise ValueError(f"{json_file}: expected a JSON list of histories, each a list of item ids")
    return [[i if isinstance(i, dict) else str(i) for i in h] for h in histories]


def recommend_once(cfg: Config, model_dir: str, histories: list[list[str | dict]], k: int, skip_unknown: bool) -> list[dict]:
    """One `{"history": [...], "items": [{"item_id", "score"}, ...]}` per history.
    Unknown ids raise UnknownItemsError, or with `skip_unknown` are dropped (with their timestamps
    and actions) with a warning."""
    if not 1 <= k <= cfg.serving.max_k:
        raise ValueError(f"--k={k}: expected 1 <= k <= serving.max_k={cfg.serving.max_k}")
    recommender = Recommender(load_exported(model_dir, cfg))
    ids, times, actions = split_events(histories)
    unknown = recommender.unknown([i for h in ids for i in h])
    if unknown and not skip_unknown:
        raise UnknownItemsError(unknown)
    if unknown:
        log.warning(f"skipped {UnknownItemsError(unknown)}")
        skipped = set(unknown)
        keep = [[i not in skipped for i in h] for h in ids]
        ids, times, actions = ([None if v is None else [x for x, kept in zip(v, mask) if kept] for v, mask in zip(part, keep)]
                               for part in (ids, times, actions))
    empty = [n for n, h in enumerate(ids) if not h]
    if empty:
        raise ValueError(f"history number(s) {', '.join(str(n + 1) for n in empty)} hold no known item id")
    return [{"history": history, "items": [{"item_id": i, "score": s} for i, s in row]}
            for history, row in zip(ids, recommender.recommend(ids, k, (), times, actions))]
