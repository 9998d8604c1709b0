"""Small training shards written directly with `webdataset.TarWriter`, for tests of the streams."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds


def write_train_shards(folder: Path, sizes: list[int]) -> list[str]:
    """One tar per entry of `sizes`, with that many sequences (lengths 3-9, distinct keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, n = [], 0
    for i, size in enumerate(sizes):
        url = str(folder / f"train-{i:06d}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(size):
                sink.write({"__key__": f"{n:09d}", "seq.npy": np.arange(n % 7 + 3, dtype=np.int32), "json": {}})
                n += 1
        urls.append(url)
    return urls
