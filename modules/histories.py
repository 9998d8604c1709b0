"""Batching variable-length histories, shared by training, evaluation and serving (and so free
of Lightning, which a serving machine need not install).

A history is its items plus, per item, two codes the user tower may embed: the time since the
user's previous interaction (`time_gap_codes`) and the action taken (manifest.json's `actions`).
Code 0 means unknown (no previous interaction, no action, or padding)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

TIME_GAP_CODES = 28
"Codes 0..27 of `time_gap_codes`."


def time_gap_codes(times: np.ndarray) -> np.ndarray:
    """[n] int64: for each interaction (times in epoch seconds, oldest first) the log2 bucket of the
    seconds since the one before, 1 + min(floor(log2(gap + 1)), 26): 1 for the same second, 2 for
    1-2 s, 3 for 3-6 s, ..., 27 for about two years and more; 0 for the first (nothing before)."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    codes = np.zeros(len(times), dtype=np.int64)
    codes[1:] = 1 + np.minimum(np.floor(np.log2(np.maximum(gaps, 0.0) + 1.0)), TIME_GAP_CODES - 2)
    return codes


class Histories(NamedTuple):
    """A batch of histories, left-padded so that the newest item is last."""

    items: torch.Tensor
    "[B, L] item indices, -1 where there is none."
    gaps: torch.Tensor
    "[B, L] time-gap codes, 0 where unknown."
    actions: torch.Tensor
    "[B, L] action codes, 0 where unknown."

    @classmethod
    def of(cls, items: torch.Tensor) -> "Histories":
        """Item indices [B, L] with every code unknown."""
        return cls(items, torch.zeros_like(items), torch.zeros_like(items))

    def newest(self, length: int) -> "Histories":
        """The newest `length` positions of every history."""
        return Histories(*(part[:, -length:] for part in self))


def pad_left(seqs: list[np.ndarray], length: int | None = None, fill: int = -1) -> torch.Tensor:
    """[B, L] long, newest item last, `fill` where there is none; sequences longer than L keep their end."""
    length = length or max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), length), fill, dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = seq[-length:]
        if len(seq):
            out[row, length - len(seq):] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    return out


def pad_histories(items: list[np.ndarray], gaps: list[np.ndarray], actions: list[np.ndarray], length: int | None = None) -> Histories:
    """`Histories` of index-aligned per-user arrays (items, their time-gap and action codes)."""
    length = length or max(1, max(len(s) for s in items))
    return Histories(pad_left(items, length), pad_left(gaps, length, 0), pad_left(actions, length, 0))
