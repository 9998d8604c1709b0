"""Settings of `twotower export` (which FAISS index) and `twotower serve` (request limits).

Part of `Config` as `serving.*` keys, like every other setting."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServingConfig:
    """The item index of an exported model and the bounds of what one request may ask."""

    hnsw_min_items: int = 100_000
    "Catalogues with at least this many items get an HNSW index (approximate); smaller ones an exact IndexFlatIP."
    hnsw_m: int = 32
    "HNSW: neighbours per node (more: better recall, more memory)."
    hnsw_ef_construction: int = 40
    "HNSW: candidate list size while building (FAISS's default). 200 cost 4-5x the build CPU on 100k items for the same recall@10 on vectors of intrinsic dimension 16; on uniform vectors (the worst case) efSearch 256 instead of 128 buys the difference back (bench/serve.py)."
    hnsw_ef_search: int = 128
    "HNSW: candidate list size while searching (more: better recall, slower); stored in the index."
    max_k: int = 1000
    "Largest k a request may ask for."
    max_history: int = 1000
    "Most item ids in one history (or exclude list); the user tower reads only the newest data.max_len."
    max_batch: int = 256
    "Most histories in one /recommend request."
    max_new_items: int = 1000
    "Most items in one /items request."
    max_events: int = 1000
    "Most events in one /events request."
    max_body_bytes: int = 1 << 20
    "Largest request body (bytes); a larger one gets 413 before it is read or parsed. Raise it for big /items batches."
    reload_interval_s: float = 2.0
    "`serve` checks its export folder for a newer export this often (seconds) and swaps to it; 0: never."
    torch_threads: int = 1
    "torch intra-op threads in `serve` (0: torch's default); requests already run in parallel, so more oversubscribes the cores."
    search_threads: int = 1
    "FAISS (OpenMP) threads in `serve` (0: FAISS's default, every core). One search is one query, and requests already run in parallel: more threads only spin (an exact search of 10k items took 1.4 ms of CPU with 2 threads, 0.14 ms with 1, on 2 cores)."

    def __post_init__(self) -> None:
        for key in ("hnsw_min_items", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                    "max_k", "max_history", "max_batch", "max_new_items", "max_events", "max_body_bytes"):
            if getattr(self, key) <= 0:
                raise ValueError(f"serving.{key}={getattr(self, key)!r}: expected a positive number")
        if self.reload_interval_s < 0:
            raise ValueError(f"serving.reload_interval_s={self.reload_interval_s!r}: expected 0 (off) or more seconds")
        for key in ("torch_threads", "search_threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"serving.{key}={getattr(self, key)!r}: expected 0 (the library's default) or more")
