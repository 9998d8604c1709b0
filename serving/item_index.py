"""The searchable item catalogue of a served model: the id <-> index map, the item vectors (which
the user tower reads for a history) and a FAISS inner-product index over them.

Items are appended while searches run (`twotower serve`, `POST /items`): a readers-writer lock lets
any number of searches share the index and gives one append at a time exclusive access, since FAISS
indexes are safe for concurrent searches but not for a search concurrent with `add`."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from twotower.configs.serving import ServingConfig


def build_index(vectors: np.ndarray, cfg: ServingConfig) -> faiss.Index:
    """Exact `IndexFlatIP` below `cfg.hnsw_min_items` items, else HNSW with the inner-product metric.
    Row i of `vectors` gets FAISS label i, so labels are item indices."""
    dim = vectors.shape[1]
    if len(vectors) < cfg.hnsw_min_items:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


class ReadWriteLock:
    """Many readers or one writer. A waiting writer holds back new readers, so a stream of
    searches cannot starve an append. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class DuplicateItemsError(ValueError):
    """New items whose ids the catalogue has already."""

    def __init__(self, item_ids: list[str]):
        super().__init__(f"item id(s) already in the catalogue: {', '.join(map(repr, item_ids[:20]))}"
                         + (f" and {len(item_ids) - 20} more" if len(item_ids) > 20 else ""))
        self.item_ids = item_ids


class ItemIndex:
    """Item ids, their vectors and the FAISS index, in one order (item index = FAISS label).

    Call `positions`, `vectors` and `search` inside one `reading()` block, so that they see the
    same catalogue; `add` takes the write side itself."""

    def __init__(self, item_ids: list[str], vectors: torch.Tensor, index: faiss.Index):
        if not len(item_ids) == len(vectors) == index.ntotal:
            raise ValueError(f"{len(item_ids)} item ids, {len(vectors)} vectors and {index.ntotal} indexed items: expected equal counts")
        self._ids = list(item_ids)
        self._position = {item_id: i for i, item_id in enumerate(self._ids)}
        self._buffer = vectors.float().contiguous()  # grows by doubling, so appends cost O(new) amortised
        self._count = len(vectors)
        self._index = index
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return self._count

    @property
    def index_type(self) -> str:
        return type(self._index).__name__

    def reading(self):
        return self._lock.read()

    def positions(self, item_ids: list[str]) -> tuple[list[int], list[str]]:
        """Indices of the known ids (in order) and the unknown ids."""
        known = [self._position.get(i) for i in item_ids]
        return [p for p in known if p is not None], [i for i, p in zip(item_ids, known) if p is None]

    @property
    def vectors(self) -> torch.Tensor:
        """[N, d] float32 item vectors (a view: do not modify)."""
        return self._buffer[: self._count]

    def search(self, queries: np.ndarray, k: int, exclude: list[set[int]]) -> list[list[tuple[str, float]]]:
        """Top-k (item id, inner product) per query row, best first, without the indices in
        `exclude[row]`. Asks FAISS for k + len(exclude[row]) so that k remain after filtering."""
        fetch = min(self._count, k + max(map(len, exclude), default=0))
        scores, labels = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        results = []
        for row_scores, row_labels, skip in zip(scores, labels, exclude):
            kept = [(self._ids[j], float(s)) for s, j in zip(row_scores, row_labels) if j >= 0 and j not in skip]
            results.append(kept[:k])
        return results

    def add(self, item_ids: list[str], vectors: torch.Tensor) -> int:
        """Append items (ids new and distinct); returns the new catalogue size. Raises
        DuplicateItemsError naming ids that exist already."""
        with self._lock.write():
            taken = [i for i in item_ids if i in self._position]
            if taken:
                raise DuplicateItemsError(taken)
            end = self._count + len(item_ids)
            if end > len(self._buffer):
                grown = self._buffer.new_empty(max(end, 2 * len(self._buffer)), self._buffer.shape[1])
                grown[: self._count] = self._buffer[: self._count]
                self._buffer = grown
            self._buffer[self._count:end] = vectors.float()
            self._index.add(np.ascontiguousarray(self._buffer[self._count:end].numpy()))
            self._ids.extend(item_ids)
            self._position.update({item_id: self._count + n for n, item_id in enumerate(item_ids)})
            self._count = end
            return end

