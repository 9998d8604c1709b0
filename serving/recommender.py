"""Recommendations from an exported model: histories of item ids -> top-K item ids with scores,
and new items embedded by the item tower and appended to the live index. Shared by
`twotower recommend` (one shot) and `twotower serve` (HTTP); thread-safe.

The user vector comes from the history as given (newest last): the user tower reads the item
vectors of its newest `data.max_len` items, exactly as in evaluation (`pad_histories` to max_len),
and the score of an item is <user, item> / temperature, as `TwoTower.scores` computes it. A model
trained with the time-gap or action feature needs each history item's timestamp or action.

`swap` replaces the served model and catalogue with a newer export (`twotower update --export`)
while requests run: each request reads one `Served` snapshot from start to end, so it is answered
wholly by the old model or wholly by the new, and none waits or fails. Items added live since the
old export was loaded are re-embedded by the new model and carried over.

With an event stream (`stream.url`), a new item is claimed in the stream (`Stream.claim_items`)
before it is added, and items other writers claimed are added as the server reads them
(`follow`, called by `serving.stream_items`); both count as added live."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from twotower.modules.histories import pad_histories, time_gap_codes
from twotower.modules.item_text import item_texts, tokenize
from twotower.serving.export_format import Exported
from twotower.serving.item_index import DuplicateItemsError, ItemIndex

__all__ = ["ClaimedItemsError", "DuplicateItemsError", "Recommender", "UnknownItemsError"]


class UnknownItemsError(ValueError):
    """Item ids that the catalogue does not have."""

    def __init__(self, item_ids: list[str]):
        unique = list(dict.fromkeys(item_ids))
        shown = ", ".join(map(repr, unique[:20])) + (f" and {len(unique) - 20} more" if len(unique) > 20 else "")
        super().__init__(f"unknown item id(s): {shown}")
        self.item_ids = unique


class ClaimedItemsError(ValueError):
    """New items whose ids another writer of the stream claimed first (not added); `added`: the
    other items of the request, which this server claimed and added."""

    def __init__(self, item_ids: list[str], added: list[str]):
        super().__init__(f"item id(s) already claimed in the stream by another writer: {', '.join(map(repr, item_ids[:20]))}"
                         + (f" and {len(item_ids) - 20} more" if len(item_ids) > 20 else "")
                         + (f"; the other {len(added)} item(s) of the request were added" if added else ""))
        self.item_ids, self.added = item_ids, added


def split_events(histories: list[list[str | dict]]) -> tuple[list[list[str]], list[list[float] | None], list[list[str] | None]]:
    """Histories whose items are ids or `{"item_id", "timestamp", "action"}` objects -> (ids,
    timestamps, actions) per history, each of the latter a list with one per item, or None when no
    item of that history has it."""
    ids, times, actions = [], [], []
    for number, history in enumerate(histories, start=1):
        events = [e if isinstance(e, dict) else {"item_id": e} for e in history]
        ids.append([str(e.get("item_id", "")) for e in events])
        for field, out in (("timestamp", times), ("action", actions)):
            values = [e.get(field) for e in events]
            if any(v is None for v in values) and any(v is not None for v in values):
                raise ValueError(f"history {number}: give every item its {field}, or none")
            out.append(None if values[0] is None else values)
    return ids, times, actions


def feature_codes(exported: Exported, histories: list[list[str]], times: list[list[float] | None] | None,
                  actions: list[list[str] | None] | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(time-gap codes, action codes) per history, as training coded them; unknown (0) for a feature
    the model does not have. Names the history and the problem when one it has is missing or bad."""
    user, n = exported.cfg.model.user, len(histories)
    times, actions = times or [None] * n, actions or [None] * n
    vocabulary = {value: code for code, value in enumerate(exported.actions, start=1)}
    gaps, codes = [], []
    for number, (history, when, acts) in enumerate(zip(histories, times, actions), start=1):
        for wanted, given, what in ((user.time_gaps, when, "timestamp"), (user.actions, acts, "action")):
            if wanted and (given is None or len(given) != len(history)):
                raise ValueError(f"history {number}: this model reads each item's {what} (model.user."
                                 f"{'time_gaps' if what == 'timestamp' else 'actions'}=true); give one per item "
                                 f"({len(history)}), got {'none' if given is None else len(given)}")
        if user.time_gaps:
            when = np.asarray(when, dtype=np.float64)
            if not np.isfinite(when).all() or (np.diff(when) < 0).any():
                raise ValueError(f"history {number}: timestamps must be finite epoch seconds, oldest first")
            gaps.append(time_gap_codes(when))
        else:
            gaps.append(np.zeros(len(history), dtype=np.int64))
        if user.actions:
            unknown = sorted({str(a) for a in acts} - vocabulary.keys())
            if unknown:
                raise ValueError(f"history {number}: unknown action(s) {', '.join(map(repr, unknown[:10]))}; "
                                 f"the model knows {', '.join(map(repr, exported.actions))}")
            codes.append(np.array([vocabulary[str(a)] for a in acts], dtype=np.int64))
        else:
            codes.append(np.zeros(len(history), dtype=np.int64))
    return gaps, codes


@dataclass(frozen=True)
class Served:
    """One exported model with its live catalogue."""

    exported: Exported
    items: ItemIndex

    @classmethod
    def of(cls, exported: Exported) -> Served:
        return cls(exported, ItemIndex(exported.item_ids, exported.vectors, exported.index))


class Recommender:
    def __init__(self, exported: Exported):
        self._served = Served.of(exported)
        self._adding = threading.Lock()  # one append (or swap) at a time; a fast tokenizer is not thread-safe
        self._added: list[dict[str, str]] = []  # items added live since the served export was loaded
        self.swaps = 0

    @property
    def items(self) -> ItemIndex:
        return self._served.items

    @property
    def cfg(self):
        return self._served.exported.cfg

    @property
    def mode(self) -> str:
        return self.cfg.model.mode

    @property
    def export_id(self) -> str:
        return self._served.exported.export_id

    def unknown(self, item_ids: list[str]) -> list[str]:
        """The ids in `item_ids` that are not in the catalogue."""
        with self.items.reading():
            return self.items.positions(item_ids)[1]

    def swap(self, exported: Exported) -> int:
        """Serve `exported` from now on; requests already running finish on the old one. Items
        added live that the new export lacks are embedded by its item tower and added (in id mode
        they cannot be, and are dropped). Returns how many were carried over."""
        served = Served.of(exported)
        with self._adding:
            with served.items.reading():
                carried = [r for r in self._added if served.items.positions([r["item_id"]])[1]]
            if carried and exported.model.item_tower.uses_text:
                self._embed_and_add(served, carried)
            else:
                carried = []
            self._served, self._added = served, carried
            self.swaps += 1
        return len(carried)

    @torch.inference_mode()
    def recommend(self, histories: list[list[str]], k: int, exclude: Sequence[str] = (),
                  times: list[list[float] | None] | None = None,
                  actions: list[list[str] | None] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (item id, score) per history, best first; the history's items and `exclude` are
        never recommended. `times` (epoch seconds) and `actions` (values of the data's action
        column): per history, one per item, or None; the model reads those of the features it
        was trained with (`model.user.time_gaps`, `model.user.actions`), which it then needs.
        Raises UnknownItemsError naming every id not in the catalogue."""
        if not histories or any(not h for h in histories):
            raise ValueError("every history needs at least one item id")
        served = self._served  # one snapshot for the whole request (see `swap`)
        cfg, items = served.exported.cfg, served.items
        gaps, codes = feature_codes(served.exported, histories, times, actions)
        with items.reading():
            positions, unknown = [], []
            for history in histories:
                known, missing = items.positions(history)
                positions.append(known)
                unknown += missing
            excluded, missing = items.positions(list(exclude))
            if unknown or missing:
                raise UnknownItemsError(unknown + missing)
            # Padded to the longest history of the request (at most data.max_len): the user vector
            # does not depend on padding, its cost does.
            width = min(cfg.data.max_len, max(len(p) for p in positions))
            padded = pad_histories([np.asarray(p, dtype=np.int64) for p in positions], gaps, codes, width)
            users = served.exported.model.user_vectors(padded, items.vectors)
            skip = [set(p) | set(excluded) for p in positions]
            results = items.search(users.numpy(), k, skip)
        temperature = cfg.model.loss.temperature
        return [[(item_id, score / temperature) for item_id, score in row] for row in results]

    @property
    def embeds_new_items(self) -> bool:
        """Whether the served model can embed a new item (it reads text: mode text or id+text)."""
        return self._served.exported.model.item_tower.uses_text

    @torch.inference_mode()
    def add_items(self, records: list[dict[str, str]], claim: Callable[[list[dict]], list[bool]] | None = None) -> int:
        """Embed new items (`item_id` plus text fields of `data.text_fields`) with the item tower,
        exactly as `prepare` and the tower see catalogue text, and append them to the index.
        Returns the new catalogue size. In id+text mode a new item has only its text vector (it
        has no learned ID embedding yet); in id mode it cannot be embedded at all.

        `claim` (`Stream.claim_items`) is called once the items are valid and none is in the
        catalogue (else DuplicateItemsError, nothing claimed): the items it claims are added, and
        ClaimedItemsError names those another writer had claimed."""
        if not self.embeds_new_items:
            raise ValueError("model.mode=id: new items have no learned embedding and no text tower; "
                             "they become recommendable after retraining")
        fields = list(self.cfg.data.text_fields)
        ids = [str(r.get("item_id") or "") for r in records]
        names = [repr(i) if i else f"number {n + 1}" for n, i in enumerate(ids)]
        problems = [f"item {name}: no item_id" for name, i in zip(names, ids) if not i]
        problems += [f"item {name}: unknown field {f!r} (text fields are {', '.join(fields)})"
                     for name, r in zip(names, records) for f in r if f != "item_id" and f not in fields]
        problems += [f"item id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
        texts = item_texts(records, fields)
        problems += [f"item {name}: no text in any of {', '.join(fields)}" for name, text in zip(names, texts) if not text]
        if problems:
            raise ValueError("; ".join(problems[:20]))
        with self._adding:  # every add holds it: the catalogue cannot gain an id between this check and the add
            with self.items.reading():
                unknown = set(self.items.positions(ids)[1])
            present = [i for i in ids if i not in unknown]
            if present:
                raise DuplicateItemsError(present)
            refused = []
            if claim is not None:
                won = claim(records)
                refused = [r["item_id"] for r, ok in zip(records, won) if not ok]
                records = [r for r, ok in zip(records, won) if ok]
            size = self._embed_and_add(self._served, records) if records else len(self.items)
            self._added += records
        if refused:
            raise ClaimedItemsError(refused, [r["item_id"] for r in records])
        return size

    def follow(self, records: list[dict[str, str]]) -> list[str]:
        """Add the items of `records` (valid ones, read from the stream's items log) that the
        catalogue lacks: embedded and kept like items added live. Returns their ids."""
        with self._adding:
            with self.items.reading():
                new = {r["item_id"]: r for r in records if self.items.positions([r["item_id"]])[1]}
            if new:
                self._embed_and_add(self._served, list(new.values()))
                self._added += new.values()
        return list(new)

    @staticmethod
    @torch.inference_mode()
    def _embed_and_add(served: Served, records: list[dict[str, str]]) -> int:
        """Tokenise and embed validated records with `served`'s item tower and add them to its
        catalogue; raises DuplicateItemsError for ids it has. The caller holds `_adding`."""
        exported, cfg = served.exported, served.exported.cfg
        texts = item_texts(records, list(cfg.data.text_fields))
        tokens = [torch.from_numpy(t.astype(np.int64)) for t in tokenize(exported.tokenizer, texts, cfg.data.max_text_len)]
        lengths = torch.tensor([len(t) for t in tokens])
        input_ids = pad_sequence(tokens, batch_first=True, padding_value=0)
        mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        vectors = exported.model.item_tower.encode_new(input_ids, mask)
        return served.items.add([r["item_id"] for r in records], vectors)
