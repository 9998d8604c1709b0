"""The item catalogue every rank needs (token ids, lengths, training counts, cold flags, ids and
texts), stored once per machine and memory-mapped by every process on it.

Each rank used to read every item shard into Python lists and a dense int64 [N, T] tensor of its
own, so a machine with W ranks held W copies (1M items x 32 tokens: 256 MB of tokens per rank,
plus the lists of ids and texts). Now the first process of a machine to get there reads the item
shards (through `iter_all`, whatever their URLs) into `.npy` files in a per-machine cache folder
(`data.cache_dir`); every process maps those files read-only-shared (copy-on-write, never
written), so their pages are in memory once per machine, whatever the number of ranks, and are
read from disk only as they are used.

The folder is built under a temporary name and renamed when complete (`twotower.files.atomic_folder`),
under a file lock, so concurrent processes build it once and none reads a partial one. Its name
hashes manifest.json and each item shard's size and modification time (for local files), so a
re-prepared or damaged shard gives a new folder, never a stale one. A `check.json` holds every
file's size and CRC-32, verified before the folder is used: a corrupted folder is built again."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twotower.datamodules.shards import (
    Fault,
    Faults,
    Location,
    ShardError,
    iter_all,
    member_url,
    shard_counts,
    split_reader,
)
from twotower.files import atomic_folder, exclusive

ARRAYS = ("tokens", "lengths", "train_counts", "cold")
"The numeric columns, one .npy file each."
STRINGS = ("item_ids", "texts")
"The string columns, each a UTF-8 buffer (`NAME.npy`) and N+1 offsets (`NAME.offsets.npy`)."
CHECK = "check.json"


class Strings(Sequence):
    """N strings stored as one UTF-8 byte buffer and N+1 offsets into it (both memory-mapped):
    a list of 1M item ids or texts per rank costs ~100 MB of Python objects, these cost nothing
    until an entry is read. Compares equal to any sequence of the same strings."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} strings")
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Strings({len(self)})"

    @staticmethod
    def write(folder: Path, name: str, strings: Iterable[str]) -> None:
        encoded = [s.encode() for s in strings]
        np.save(folder / f"{name}.npy", np.frombuffer(b"".join(encoded), dtype=np.uint8))
        np.save(folder / f"{name}.offsets.npy", np.cumsum([0, *map(len, encoded)], dtype=np.int64))


@dataclass
class Catalogue:
    item_ids: Sequence[str]
    "Item index -> item id (a `Strings` when loaded from shards: memory-mapped, read on use)."
    texts: Sequence[str]
    "Item index -> the text the item tower reads."
    tokens: torch.Tensor
    "[N, T] int32 token ids, right-padded with 0; T is the longest text."
    lengths: torch.Tensor
    "[N] int64 token counts."
    train_counts: torch.Tensor
    "[N] int64 occurrences in training sequences."
    cold: torch.Tensor
    "[N] bool: held out of training."

    def __len__(self) -> int:
        return len(self.item_ids)


def default_cache_dir() -> Path:
    """A folder on this machine's own disk (the system temp dir, per user): one copy per machine,
    not one per node on a shared home folder."""
    return Path(tempfile.gettempdir()) / f"twotower-{os.getuid()}" / "catalogue"


def _shard_stamp(url: str) -> list | None:
    """(size, mtime in ns) of a local shard, so that one rewritten or damaged after the cache was
    built gives another key; None where it is missing or not a local file (a remote URL: then the
    manifest alone keys it)."""
    try:
        stat = os.stat(url)
    except (OSError, ValueError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def cache_key(manifest: dict, urls: list[str]) -> str:
    """What the catalogue depends on: manifest.json (fingerprint, counts, shard counts, appends,
    tokenizer) and each item shard's name and stamp; not the data folder's path, so a copy of the
    folder (`cp -p`, `copytree`) reuses the cache."""
    shards = [[Path(url).name, _shard_stamp(url)] for url in urls]
    return hashlib.sha256(json.dumps([manifest, shards], sort_keys=True).encode()).hexdigest()[:20]


def _files() -> list[str]:
    return [f"{a}.npy" for a in ARRAYS] + [f"{s}{part}.npy" for s in STRINGS for part in ("", ".offsets")]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _write_check(folder: Path) -> None:
    check = {name: [(folder / name).stat().st_size, _crc32(folder / name)] for name in _files()}
    (folder / CHECK).write_text(json.dumps(check, indent=1))


def is_complete(folder: Path, num_items: int) -> bool:
    """The folder holds every file, each of the size and CRC-32 that `check.json` recorded when it
    was built, and `num_items` items: anything else (a crash mid-copy, a truncated or overwritten
    file) is never used."""
    try:
        check = json.loads((folder / CHECK).read_text())
        for name in _files():
            size, crc = check[name]
            if (folder / name).stat().st_size != size or _crc32(folder / name) != crc:
                return False
        return len(np.load(folder / "lengths.npy", mmap_mode="r")) == num_items
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _missing_items(folder: Location, n: int, seen: np.ndarray, count: int) -> ShardError:
    """The error of item shards that do not hold each index 0..n-1 exactly once."""
    gap = int(np.argmin(seen)) if not seen.all() else None
    problem = f"item index {gap} is in no item shard" if gap is not None else f"the item shards hold {count} items"
    return ShardError(Fault("items", member_url(folder, "manifest.json"), "counts.items", "manifest",
                            f"{n} items, but {problem} (an item cannot be skipped)", None))


def _build(out: Path, folder: Location, manifest: dict, urls: list[str]) -> None:
    """Read every item shard once, in one streaming pass, and write the columns to `out` in index
    order. Item shards are never skipped: any fault raises (naming the file and member), and so does
    an index that no shard holds (naming manifest.json)."""
    n = manifest["counts"]["items"]
    width = int(manifest.get("tokenizer", {}).get("max_text_len") or 32)
    tokens = np.zeros((n, width), dtype=np.int32)
    lengths, counts = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    cold, seen = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    ids, texts = [""] * n, [""] * n
    total = 0
    for sample in iter_all(urls, split_reader("items", Faults("raise"), shard_counts(folder, manifest))):
        total += 1
        meta, ids_of = sample["json"], sample["tokens.npy"]
        i = meta["index"]
        if not 0 <= i < n or seen[i]:
            continue  # a duplicate or an index past the catalogue: counted in `total`, reported below
        if len(ids_of) > tokens.shape[1]:  # longer than the manifest says: widen
            tokens = np.pad(tokens, ((0, 0), (0, max(len(ids_of), 2 * tokens.shape[1]) - tokens.shape[1])))
        tokens[i, :len(ids_of)] = ids_of
        lengths[i], counts[i], cold[i], seen[i] = len(ids_of), meta["train_count"], meta["cold"], True
        ids[i], texts[i] = meta["item_id"], sample["txt"]
    if total != n or not seen.all():
        raise _missing_items(folder, n, seen, total)
    np.save(out / "tokens.npy", np.ascontiguousarray(tokens[:, :int(lengths.max()) if n else 0]))
    for name, array in (("lengths", lengths), ("train_counts", counts), ("cold", cold)):
        np.save(out / f"{name}.npy", array)
    Strings.write(out, "item_ids", ids)
    Strings.write(out, "texts", texts)
    _write_check(out)


def _open(where: Path) -> Catalogue:
    """Torch views of the mapped files, no copy. Copy-on-write (`mmap_mode="c"`): torch gets the
    writable array it wants, every page stays the shared page-cache page unless written (nothing
    writes them)."""
    arrays = {name: torch.from_numpy(np.load(where / f"{name}.npy", mmap_mode="c")) for name in ARRAYS}
    strings = {name: Strings(np.load(where / f"{name}.npy", mmap_mode="r"), np.load(where / f"{name}.offsets.npy", mmap_mode="r"))
               for name in STRINGS}
    return Catalogue(**strings, **arrays)


def load_catalogue(folder: Location, manifest: dict, cache_dir: str | Path | None = None) -> Catalogue:
    """Every item, in index order, memory-mapped from this machine's cache (`cache_dir`, default
    `default_cache_dir()`), which the first process to need it builds from the item shards."""
    urls = [member_url(folder, s) for s in manifest["shards"]["items"]]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(manifest, urls)
    where, n = root / f"catalogue-{key}", manifest["counts"]["items"]
    if not is_complete(where, n):
        with exclusive(root / f".catalogue-{key}.lock"):
            if not is_complete(where, n):  # another process may have built it while this one waited
                with atomic_folder(where) as tmp:
                    _build(tmp, folder, manifest, urls)
    return _open(where)
