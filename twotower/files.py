"""Files and folders written so that a crash or a full disk never leaves one half-written.

Each is written under a temporary name beside its real one, flushed to disk (fsync), then renamed
over the real name (a rename within one folder is atomic), and the folder itself is flushed so that
the rename survives a power loss. Readers see the old content or the new, never a mix; a failed
write removes its temporary and leaves the old content as it was."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix, so writers that choose a format by the
    name still do) to write; when the block ends without error it is flushed and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, sort_keys=indent is not None) + "\n")


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `out` to fill; when the block ends without error,
    every file in it is flushed and it replaces `out` (an existing `out` is removed only once the new
    folder is in place). On error the temporary folder is removed and `out` is left as it was."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
            fsync_path(path)
        fsync_path(tmp)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(lock_file: str | Path) -> Iterator[None]:
    """One process at a time (of this machine; of every machine when `lock_file` is on a shared
    filesystem): the others wait here, then usually find done what the first one did."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
