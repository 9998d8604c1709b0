"""Item text as the item tower reads it: each field with its name, in the configured order,
pre-tokenised at prepare time with the item tower's own tokenizer."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modules.item_tower import resolve_encoder


def item_texts(items: pd.DataFrame, fields: list[str]) -> list[str]:
    """`title: Toy Story (1995); genres: Animation, Comedy` — empty fields are left out."""
    columns = [items[f].fillna("").astype(str).str.strip() for f in fields]
    return ["; ".join(f"{name}: {value}" for name, value in zip(fields, row) if value) for row in zip(*columns)]


def load_tokenizer(encoder: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_encoder(encoder))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition, so shards and model can be checked to match."""
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode()).hexdigest()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> list[np.ndarray]:
    """Token ids per text (with special tokens, truncated to max_len), as int32 arrays."""
    encoded = tokenizer(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]
