"""WebDataset tar shards: writing them (size-bounded, `webdataset.ShardWriter`) and reading
small ones back whole (evaluation users, the item catalogue)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import webdataset as wds


def write_shards(folder: Path, prefix: str, samples: Iterable[dict], max_count: int) -> list[str]:
    """Write `samples` to `folder/prefix-000000.tar, ...`; return the shard names, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=max_count, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(p.name for p in folder.glob(f"{prefix}-*.tar"))


def read_all(urls: list[str]) -> list[dict]:
    """Every sample of these shards, decoded, in file order, on every rank (no node or worker
    splitting, unlike `wds.WebDataset`'s defaults once torch.distributed is up)."""
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode())) if urls else []
