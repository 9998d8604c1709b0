"""Batching variable-length histories, shared by training, evaluation and serving (and so free
of Lightning, which a serving machine need not install)."""
from __future__ import annotations

import numpy as np
import torch


def pad_left(seqs: list[np.ndarray], length: int | None = None) -> torch.Tensor:
    """[B, L] long, newest item last, -1 where there is none; sequences longer than L keep their end."""
    length = length or max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), length), -1, dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = seq[-length:]
        if len(seq):
            out[row, length - len(seq):] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    return out
