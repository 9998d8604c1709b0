"""Item text as the item tower reads it: each field with its name, in the configured order,
pre-tokenised at prepare time with the item tower's own tokenizer (and at request time with the
exported one, for items added to a running server)."""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from twotower.modules.item_tower import resolve_encoder


def _is_missing(value) -> bool:
    """None, NaN, and pandas' NA/NaT (without importing pandas, which serving does not install)."""
    return value is None or (isinstance(value, float) and value != value) or type(value).__name__ in ("NAType", "NaTType")


def item_text(record: Mapping[str, object], fields: list[str]) -> str:
    """`title: Toy Story (1995); genres: Animation, Comedy`; missing and empty fields are left out."""
    values = (("" if _is_missing(record.get(name)) else str(record.get(name)).strip()) for name in fields)
    return "; ".join(f"{name}: {value}" for name, value in zip(fields, values) if value)


def item_texts(records: Iterable[Mapping[str, object]], fields: list[str]) -> list[str]:
    """`item_text` of each record (a DataFrame's rows: `frame.to_dict("records")`)."""
    return [item_text(record, fields) for record in records]


def load_tokenizer(encoder: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_encoder(encoder))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition, so shards and model can be checked to match."""
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode()).hexdigest()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int, progress: str | None = None,
             chunk: int = 10_000) -> list[np.ndarray]:
    """Token ids per text (with special tokens, truncated to max_len), as int32 arrays; `chunk`
    texts per tokenizer call, with a progress bar named `progress` if given."""
    starts = range(0, len(texts), chunk)
    bar = tqdm(total=len(texts), desc=progress, unit="item", disable=progress is None or len(texts) <= chunk)
    out = []
    for start in starts:
        encoded = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_len, padding=False)["input_ids"]
        out += [np.asarray(ids, dtype=np.int32) for ids in encoded]
        bar.update(len(encoded))
    bar.close()
    return out
