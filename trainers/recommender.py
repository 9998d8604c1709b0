"""Recommendations from an exported model: histories of item ids -> top-K item ids with scores,
and new items embedded by the item tower and appended to the live index. Shared by
`twotower recommend` (one shot) and `twotower serve` (HTTP); thread-safe.

The user vector comes from the history as given (newest last): the user tower reads the item
vectors of its newest `data.max_len` items, exactly as in evaluation (`pad_left` to max_len), and
the score of an item is <user, item> / temperature, as `TwoTower.scores` computes it."""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence

from datamodules.sequences import pad_left
from datamodules.item_text import item_texts, tokenize
from trainers.exported import Exported
from trainers.item_index import DuplicateItemsError, ItemIndex

__all__ = ["DuplicateItemsError", "Recommender", "UnknownItemsError"]


class UnknownItemsError(ValueError):
    """Item ids that the catalogue does not have."""

    def __init__(self, item_ids: list[str]):
        unique = list(dict.fromkeys(item_ids))
        shown = ", ".join(map(repr, unique[:20])) + (f" and {len(unique) - 20} more" if len(unique) > 20 else "")
        super().__init__(f"unknown item id(s): {shown}")
        self.item_ids = unique


class Recommender:
    def __init__(self, exported: Exported):
        self.cfg, self.model, self.tokenizer = exported.cfg, exported.model, exported.tokenizer
        self.items = ItemIndex(exported.item_ids, exported.vectors, exported.index)
        self._adding = threading.Lock()  # one append at a time (a fast tokenizer is not thread-safe)

    @property
    def mode(self) -> str:
        return self.cfg.model.mode

    def unknown(self, item_ids: list[str]) -> list[str]:
        """The ids in `item_ids` that are not in the catalogue."""
        with self.items.reading():
            return self.items.positions(item_ids)[1]

    @torch.inference_mode()
    def recommend(self, histories: list[list[str]], k: int, exclude: Sequence[str] = ()) -> list[list[tuple[str, float]]]:
        """Top-k (item id, score) per history, best first; the history's items and `exclude` are
        never recommended. Raises UnknownItemsError naming every id not in the catalogue."""
        if not histories or any(not h for h in histories):
            raise ValueError("every history needs at least one item id")
        with self.items.reading():
            positions, unknown = [], []
            for history in histories:
                known, missing = self.items.positions(history)
                positions.append(known)
                unknown += missing
            excluded, missing = self.items.positions(list(exclude))
            if unknown or missing:
                raise UnknownItemsError(unknown + missing)
            padded = pad_left([np.asarray(p, dtype=np.int64) for p in positions], self.cfg.data.max_len)
            users = self.model.user_vectors(padded, self.items.vectors)
            skip = [set(p) | set(excluded) for p in positions]
            results = self.items.search(users.numpy(), k, skip)
        temperature = self.cfg.model.loss.temperature
        return [[(item_id, score / temperature) for item_id, score in row] for row in results]

    @torch.inference_mode()
    def add_items(self, records: list[dict[str, str]]) -> int:
        """Embed new items (`item_id` plus text fields of `data.text_fields`) with the item tower,
        exactly as `prepare` and the tower see catalogue text, and append them to the index.
        Returns the new catalogue size. In id+text mode a new item has only its text vector (it
        has no learned ID embedding yet); in id mode it cannot be embedded at all."""
        if not self.model.item_tower.uses_text:
            raise ValueError("model.mode=id: new items have no learned embedding and no text tower; "
                             "they become recommendable after retraining")
        fields = list(self.cfg.data.text_fields)
        ids = [str(r.get("item_id") or "") for r in records]
        names = [repr(i) if i else f"number {n + 1}" for n, i in enumerate(ids)]
        problems = [f"item {name}: no item_id" for name, i in zip(names, ids) if not i]
        problems += [f"item {name}: unknown field {f!r} (text fields are {', '.join(fields)})"
                     for name, r in zip(names, records) for f in r if f != "item_id" and f not in fields]
        problems += [f"item id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
        texts = item_texts(pd.DataFrame(records, columns=fields), fields)
        problems += [f"item {name}: no text in any of {', '.join(fields)}" for name, text in zip(names, texts) if not text]
        if problems:
            raise ValueError("; ".join(problems[:20]))
        with self._adding:
            tokens = [torch.from_numpy(t.astype(np.int64)) for t in tokenize(self.tokenizer, texts, self.cfg.data.max_text_len)]
            lengths = torch.tensor([len(t) for t in tokens])
            input_ids = pad_sequence(tokens, batch_first=True, padding_value=0)
            mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
            vectors = self.model.item_tower.encode_text(input_ids, mask)
            return self.items.add(ids, vectors)  # raises DuplicateItemsError for ids it has
