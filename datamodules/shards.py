"""WebDataset tar shards: writing them (size-bounded, `webdataset.ShardWriter`) and reading them
back under the `data.on_error` policy.

Reading names every fault by file and member: a missing shard, one that cannot be opened or breaks
off (a truncated tar; a damaged header, after which `tarfile` stops silently), one that holds other
than the manifest's number of samples, a sample lacking a member, a member that does not decode
(`webdataset.decode`'s `DecodingError` carries the member) or decodes to nonsense. `Faults` is the
policy as a WebDataset handler: `raise` turns the fault into a `ShardError`; `skip` records it once
(with the samples it cost), logs it, and reading goes on.

A prepared shard set is read from a local folder (`data.dir`) or from a URL (`data.shards_url`:
s3://, gs://, http(s)://, ... through fsspec). A URL's shards are opened by fsspec in place of
WebDataset's `url_opener` and go through the same tar reader, so every fault reads as a local
one does, with the shard's full URL as its name."""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from twotower.datamodules.readers import DataError

log = logging.getLogger(__name__)


def write_shards(folder: Path, prefix: str, samples: Iterable[dict], max_count: int) -> dict[str, int]:
    """Write `samples` to `folder/prefix-000000.tar, ...`; return {shard name: samples}, in order.
    Members get a whole-second mtime: WebDataset's default (a float, time.time()) makes tarfile add a
    PAX header to every member, which doubled the shards' size and cost ~40 % of prepare's time."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=max_count, verbose=0, mtime=int(time.time()),
                         post=lambda name: counts.__setitem__(Path(name).name, sink.count)) as sink:
        for sample in samples:
            sink.write(sample)
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class Fault:
    """One thing that could not be read."""

    split: str
    shard: str
    "The file (as listed in the manifest, or the manifest itself)."
    member: str | None
    "The tar member (`KEY.EXT`) where it applies or where reading stopped; None: the shard as a whole."
    kind: str
    "missing | unreadable | truncated | count | incomplete | undecodable | invalid | unlisted | manifest."
    problem: str
    lost: int | None = 0
    "Samples this fault cost (None: unknown, the manifest does not say how many the shard held)."
    whole: bool = False
    "Nothing of the shard could be read."

    def __str__(self) -> str:
        where = f"{self.shard}, member {self.member}" if self.member else self.shard
        lost = "" if self.lost == 0 else f" [{'an unknown number of' if self.lost is None else self.lost} sample(s) unreadable]"
        return f"{where}: {self.problem}{lost}"


class ShardError(DataError):
    """A shard, or a member of one, that cannot be read or disagrees with the manifest."""

    def __init__(self, fault: Fault | str):
        if isinstance(fault, str):  # re-raised by a DataLoader from its worker: the message only
            super().__init__(fault)
            self.fault = None
            return
        hint = ""
        if fault.split == "items":
            hint = " (item shards are never skipped: every item of the catalogue must be readable; prepare the data again)"
        elif fault.kind not in ("manifest", "unlisted"):
            hint = " (data.on_error=skip drops what cannot be read and counts it; or prepare the data again)"
        super().__init__(f"{fault}{hint}")
        self.fault = fault


class Faults:
    """The `data.on_error` policy as a WebDataset handler (`handler=faults`) that counts.

    raise: the fault becomes a `ShardError`. skip: it is recorded once (faults met again, as a
    cycled shard is, are not counted twice), logged to stderr and, with `log_dir`, appended to this
    process's file there, so that the faults of every rank and worker can be added up at the end
    (`read_fault_logs`); the handler returns True and reading goes on. `verbose=False` records
    without logging (faults that every rank finds alike are logged by rank 0 only)."""

    def __init__(self, on_error: str = "raise", log_dir: str | Path | None = None, verbose: bool = True):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: expected raise or skip")
        self.on_error, self.log_dir, self.verbose = on_error, None if log_dir is None else str(log_dir), verbose
        self.recorded: dict[tuple, Fault] = {}

    def __getstate__(self) -> dict:  # a DataLoader worker starts with an empty record of its own
        return {**self.__dict__, "recorded": {}}

    def __call__(self, exn: BaseException) -> bool:
        fault = as_fault(exn)
        if fault is None:  # not a data fault: a bug, raise it as it is
            raise exn
        if self.on_error == "raise" or fault.split == "items":
            raise ShardError(fault) from (None if isinstance(exn, ShardError) else exn)
        self.record(fault)
        return True

    def record(self, fault: Fault) -> None:
        key = (fault.shard, fault.member, fault.kind)
        if key in self.recorded:
            return
        self.recorded[key] = fault
        if self.verbose:
            log.warning(f"data.on_error=skip: skipped {fault}")
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(Path(self.log_dir) / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(asdict(fault)) + "\n")

    def fault(self, fault: Fault) -> None:
        """Apply the policy to a fault found outside a WebDataset stage."""
        self(ShardError(fault))


def as_fault(exn: BaseException) -> Fault | None:
    """The fault an exception of a reading stage stands for (None: not a data fault)."""
    if isinstance(exn, ShardError):
        return exn.fault
    if isinstance(exn, wds.autodecode.DecodingError):  # raised by wds.decode; names sample and member
        cause = exn.__cause__
        return Fault(split=_split_of(exn.url), shard=str(exn.url), member=f"{exn.key}.{exn.k}", kind="undecodable",
                     problem=f"does not decode ({type(cause).__name__}: {cause})", lost=1)
    return None


def read_fault_logs(log_dir: str | Path) -> list[Fault]:
    """Every fault appended to `log_dir` by `Faults.record` (any rank, any worker)."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    return [Fault(**json.loads(line)) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines() if line]


def fault_counts(faults: Iterable[Fault]) -> dict[str, int]:
    """summary.json's `data/` counts: distinct faults, the samples they cost (where known), and the
    shards of which nothing could be read."""
    distinct = {(f.shard, f.member, f.kind): f for f in faults}.values()
    return {"data/faults": len(distinct),
            "data/skipped_samples": sum(f.lost or 0 for f in distinct),
            "data/skipped_shards": len({f.shard for f in distinct if f.whole})}


def _split_of(url: str | None) -> str:
    """The split a shard belongs to: the name of its folder (`DIR/train/train-000000.tar`)."""
    return Path(str(url)).parent.name if url else "?"


# ---- where a shard set is: a local folder or a URL -------------------------------------------
Location = Path | str
"A prepared shard set: a local folder (`Path`), or the base URL (`str`) of one on a remote store."


def shard_location(data_dir: str, shards_url: str | None) -> Location:
    """Where `data.*` says the prepared shards are: `data.shards_url` when set, else `data.dir`.
    A `file://` URL or a plain path is a local folder, read as `data.dir` is (plain `open`, the
    same paths in every message); any other URL stays a string and is read through fsspec."""
    if shards_url is None:
        return Path(data_dir)
    parsed = urlparse(shards_url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return shards_url.rstrip("/") if "://" in shards_url else Path(shards_url)


def is_remote(where: Location) -> bool:
    return isinstance(where, str)


def member_url(where: Location, name: str) -> str:
    """The path (local) or URL (remote) of `name` (`train/train-000000.tar`, `manifest.json`) in a
    shard set: what messages and faults name, and the key of `shard_counts`."""
    return f"{where}/{name}" if isinstance(where, str) else str(where / name)


def remote_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem of `url` and the path in it (options from the environment: for s3,
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or FSSPEC_S3_*). A scheme fsspec does not know, or
    whose package is not installed (s3fs, gcsfs), is a `DataError` naming the URL."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exn:
        raise DataError(f"{url} (data.shards_url): cannot be read through fsspec ({type(exn).__name__}: {exn})") from exn


def read_json_url(url: str) -> dict | None:
    """A remote JSON file (manifest.json); None where there is none. Any other failure (no such
    bucket, no permission, no connection) is a `DataError` naming the URL."""
    fs, path = remote_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except Exception as exn:
        raise DataError(f"{url}: cannot be read ({type(exn).__name__}: {exn})") from exn


def open_url(url: str) -> IO[bytes]:
    """A remote shard opened for one sequential pass. Over HTTP that is one streamed GET
    (`block_size=0`): plain servers ignore range requests, which fsspec's default HTTP file
    makes; other stores read ahead in blocks. A missing object raises `FileNotFoundError`, as a
    missing local file does."""
    fs, path = remote_fs(url)
    return fs.open(path, "rb", **({"block_size": 0} if urlparse(url).scheme in ("http", "https") else {}))


def fsspec_opener(sources: Iterable[dict]) -> Iterator[dict]:
    """WebDataset's `url_opener` stage through fsspec: each source with its open `stream`, which
    is closed once the tar reader has moved on. Errors are raised as they come (the reader names them)."""
    for source in sources:
        with open_url(source["url"]) as stream:
            yield {**source, "stream": stream}


def tar_samples(url: str, select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The undecoded samples of one shard: `wds.tarfile_samples` for a local path; for a URL the
    same stages (`tar_file_expander`, `group_by_keys`) after `fsspec_opener` in place of
    `url_opener`, so a truncated or damaged remote tar fails exactly as a local one does."""
    if "://" not in url:
        return wds.tarfile_samples([{"url": url}], select_files=select_files)
    return group_by_keys(tar_file_expander(fsspec_opener([{"url": url}]), select_files=select_files))


@dataclass
class ShardReader:
    """Reads the shards of one split, sample by sample, under a `Faults` policy.

    `stages()` replace `wds.tarfile_to_samples(), wds.decode()` in a pipeline. Each shard is opened
    with WebDataset's own tar reader (errors re-raised, so that they are caught per shard and named
    by the member reading stopped at) and must yield `expected[url]` samples when the manifest says
    so; every sample must have `required` members, decode, and pass `check` (None, or a problem)."""

    split: str
    faults: Faults
    required: tuple[str, ...] = ()
    expected: dict[str, int] | None = None
    "Samples per shard URL, from the manifest (None: not known, counts go unchecked)."
    check: Callable[[dict], str | None] | None = None

    def stages(self) -> list:
        return [self.samples, wds.decode(handler=self.faults), wds.map(self._checked, handler=self.faults)]

    def samples(self, sources: Iterable[dict]) -> Iterator[dict]:
        """Undecoded samples of the shards in `sources` (WebDataset `{"url": ...}` dicts)."""
        for source in sources:
            yield from self.shard(source["url"])

    def shard(self, url: str) -> Iterator[dict]:
        expected = None if self.expected is None else self.expected.get(url)
        at: list[str | None] = [None]  # the member being read: tarfile_samples shows us each name first

        def note(name: str) -> bool:
            at[0] = name
            return True

        def fault(kind: str, problem: str, lost: int | None, member: str | None = None, whole: bool = False) -> None:
            self.faults.fault(Fault(self.split, url, member, kind, problem, lost, whole))

        seen = 0
        try:
            for sample in tar_samples(url, select_files=note):
                seen += 1
                absent = [m for m in self.required if m not in sample]
                if absent:
                    fault("incomplete", f"sample lacks member(s) {', '.join(absent)}", 1, f"{sample['__key__']}.{absent[0]}")
                    continue
                yield sample
        except ShardError:
            raise
        except FileNotFoundError:
            fault("missing", "shard not found", expected, whole=True)
            return
        except Exception as exn:  # the tar is damaged: what was read before stays, the rest is lost
            lost = None if expected is None else max(expected - seen, 0)
            message = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # WebDataset appends " @ <stream>"
            if at[0] is None:
                fault("unreadable", f"not a readable tar file ({type(exn).__name__}: {message})", lost, whole=True)
            else:
                fault("truncated", f"reading stopped here ({type(exn).__name__}: {message}); {seen} sample(s) read before",
                      lost, at[0], whole=seen == 0)
            return
        if expected is not None and seen != expected:
            problem = f"holds {seen} sample(s), the manifest says {expected}"
            if seen < expected:  # tarfile ends a tar silently at a cut between members or at a damaged header
                problem += " (the tar ends early: truncated, or a damaged header" + (" after this member)" if at[0] else ")")
            fault("count", problem, max(expected - seen, 0), at[0], whole=seen == 0)

    def _checked(self, sample: dict) -> dict:
        problem = self.check(sample) if self.check else None
        if problem:
            member, _, what = problem.partition(": ")
            raise ShardError(Fault(self.split, sample.get("__url__", "?"), f"{sample['__key__']}.{member}", "invalid", what, 1))
        return sample


def iter_all(urls: list[str], reader: ShardReader | None = None) -> Iterator[dict]:
    """Every sample of these shards, decoded, in file order, on every rank (no node or worker
    splitting, unlike `wds.WebDataset`'s defaults once torch.distributed is up). Faults raise a
    `ShardError` naming file and member, or are skipped as `reader.faults` says."""
    reader = reader or ShardReader(_split_of(urls[0]) if urls else "?", Faults("raise"))
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), *reader.stages())) if urls else iter(())


def read_all(urls: list[str], reader: ShardReader | None = None) -> list[dict]:
    """`iter_all` as a list."""
    return list(iter_all(urls, reader))


# ---- the shards of a prepared folder ---------------------------------------------------------
COUNT_KEYS = {"train": ("train_samples", "train_users"), "items": ("items",)}
"The manifest's `counts` key of a split's sample count, the first there is (other splits: the split's own name)."
REQUIRED = {"train": ("seq.npy", "json"), "items": ("tokens.npy", "txt", "json")}
"Members every sample of a split has (evaluation splits: history.npy and json)."


def check_manifest(folder: Location, manifest: dict, faults: Faults) -> dict[str, list[str]]:
    """The URLs of each split's shards that are there to read. Every disagreement between
    manifest.json and the folder is a fault under `faults`: a listed shard that is missing, a tar
    in a split's folder that is not listed (not read), split counts that are not the sum of the
    per-shard counts. Cheap (no shard is opened; a remote set: one listing per split) and the
    same on every rank."""
    where, counts = member_url(folder, "manifest.json"), manifest.get("shard_counts")
    usable: dict[str, list[str]] = {}
    for split, names in manifest["shards"].items():
        usable[split] = []
        present, tars = _split_files(folder, split, names)
        for name in names:
            if member_url(folder, name) in present:
                usable[split].append(member_url(folder, name))
            else:
                lost = None if counts is None else counts.get(name)
                faults.fault(Fault(split, member_url(folder, name), None, "missing", "listed in manifest.json, not found", lost, whole=True))
        listed = {member_url(folder, name) for name in names}
        for path in tars:
            if path not in listed:
                faults.fault(Fault(split, path, None, "unlisted", "not listed in manifest.json (the manifest "
                                   "and the shards disagree: prepare again); not read", 0))
        key = next((k for k in COUNT_KEYS.get(split, (split,)) if k in manifest["counts"]), None)
        if counts is not None and key is not None:
            unknown = [name for name in names if name not in counts]
            total = sum(counts.get(name, 0) for name in names)
            if unknown or total != manifest["counts"][key]:
                problem = (f"shard_counts has no entry for {unknown[0]}" if unknown else
                           f"{manifest['counts'][key]}, but shard_counts of the {split} shards add up to {total}")
                faults.fault(Fault(split, where, f"counts.{key}", "manifest", problem, 0))
    return usable


def _split_files(folder: Location, split: str, names: list[str]) -> tuple[set[str], list[str]]:
    """(the URLs of the listed shards `names` that are there, every tar in the split's folder).
    Local: a stat per shard and a glob. Remote: one listing per folder (the split's, and any
    other the manifest names shards in), not a request per shard; where a listing shows nothing
    (a store that does not list folders, such as a plain HTTP host), its shards are looked up
    one by one."""
    if not is_remote(folder):
        return ({str(folder / name) for name in names if (folder / name).is_file()},
                [str(path) for path in sorted((folder / split).glob("*.tar"))])
    urls = [member_url(folder, name) for name in names]
    split_folder = member_url(folder, split)
    listings = {parent: _remote_tars(parent) for parent in {split_folder} | {url.rsplit("/", 1)[0] for url in urls}}
    present = {url for url in urls if url in listings[url.rsplit("/", 1)[0]]}
    unlisted_folders = {parent for parent, tars in listings.items() if not tars}
    present |= {url for url in urls if url.rsplit("/", 1)[0] in unlisted_folders and _remote_exists(url)}
    return present, listings[split_folder]


def _remote_tars(url: str) -> list[str]:
    """The URLs of the tars in a remote folder (none where it is not there or is not listed)."""
    fs, path = remote_fs(url)
    fs.invalidate_cache(path)  # a listing cached earlier in this process may be stale
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(f"{url}/{entry.rstrip('/').rsplit('/', 1)[-1]}" for entry in entries if entry.endswith(".tar"))


def _remote_exists(url: str) -> bool:
    fs, path = remote_fs(url)
    return fs.exists(path)


def shard_counts(folder: Location, manifest: dict) -> dict[str, int] | None:
    """Samples per shard URL, as manifest.json says (None: prepared before it said)."""
    counts = manifest.get("shard_counts")
    return None if counts is None else {member_url(folder, name): n for name, n in counts.items()}


def _index_array(sample: dict, member: str, num_items: int | None) -> str | None:
    """None if `sample[member]` is a 1-D integer array of item indices, else the problem."""
    value = sample[member]
    if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"):
        return f"{member}: not a 1-D integer array ({getattr(value, 'dtype', type(value).__name__)}, shape {getattr(value, 'shape', '?')})"
    if num_items is not None and value.size and (value.min() < 0 or value.max() >= num_items):
        return f"{member}: item index {int(value.max() if value.max() >= num_items else value.min())} outside the catalogue (0..{num_items - 1})"
    return None


def _events_arrays(sample: dict, items: str) -> str | None:
    """None if the optional `time.npy` and `action.npy` are absent or 1-D arrays as long as `items`."""
    for member in ("time.npy", "action.npy"):
        value = sample.get(member)
        if value is not None and not (isinstance(value, np.ndarray) and value.shape == sample[items].shape):
            return f"{member}: expected a 1-D array as long as {items} ({len(sample[items])}), got shape {getattr(value, 'shape', '?')}"
    return None


def check_sample(split: str, sample: dict, num_items: int | None = None) -> str | None:
    """What decoded but cannot be right (`MEMBER: problem`), or None."""
    if not isinstance(sample["json"], dict):
        return f"json: not an object ({type(sample['json']).__name__})"
    if split == "items":
        index = sample["json"].get("index")
        return _index_array(sample, "tokens.npy", None) or (None if isinstance(index, int) else f"json: index {index!r} is not an integer")
    if split == "train":
        return _index_array(sample, "seq.npy", num_items) or _events_arrays(sample, "seq.npy")
    target = sample["json"].get("target")
    if not isinstance(target, int) or (num_items is not None and not 0 <= target < num_items):
        return f"json: target {target!r} is not an item index"
    return _index_array(sample, "history.npy", num_items) or _events_arrays(sample, "history.npy")


def split_reader(split: str, faults: Faults, expected: dict[str, int] | None = None, num_items: int | None = None) -> ShardReader:
    """The `ShardReader` of one split of a prepared folder: its members, its checks."""
    return ShardReader(split, faults, REQUIRED.get(split, ("history.npy", "json")), expected,
                       functools.partial(check_sample, split, num_items=num_items))
