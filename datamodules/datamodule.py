"""Reading prepared shards for training and evaluation (a `LightningDataModule`).

Training streams user sequences from tar shards, cropped to the newest `max_len + 1` items (SASRec
style) and batched. Every (rank, worker) stream has its own shards and its own shuffle seed, which
also changes every epoch. Under DDP/DeepSpeed every rank must run exactly the same number of steps
or the gradient all-reduce hangs, so with more than one rank each stream is endless (shards drawn
with replacement, or its own share of shards cycled) and is cut at a fixed number of batches, the
same on every rank (open_clip's `with_epoch`). Evaluation cases and the item catalogue are small
and are read whole; each rank ranks a disjoint share of the users, padded to equal batch counts.

Damaged shards (`datamodules.shards`): missing shards and a manifest that disagrees with the folder
are found before training, alike on every rank; under `data.on_error=skip` every rank then deals
the same remaining shards. A sample that cannot be read is dropped inside one stream, which reads
on (its shards repeat) until it has its batches, so the batch counts stay equal; a stream whose
every shard is unreadable stops with an error rather than spin."""
from __future__ import annotations

import itertools
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower.configs.schema import Config
from twotower.datamodules.catalogue import Catalogue, load_catalogue  # noqa: F401 (Catalogue: imported from here before)
from twotower.datamodules.prepare import MANIFEST, read_manifest
from twotower.datamodules.readers import DataError
from twotower.datamodules.shards import (
    Fault,
    Faults,
    ShardReader,
    check_manifest,
    fault_counts,
    is_remote,
    iter_all,
    member_url,
    read_fault_logs,
    read_json_url,
    shard_counts,
    shard_location,
    split_reader,
)
from twotower.modules.histories import Histories, pad_histories, pad_left, time_gap_codes


def events_of(sample: dict, items: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items, time-gap codes, action codes) of a training sequence or an evaluation history; shards
    prepared without times or actions (or hand-written ones) read as unknown (code 0)."""
    seq = sample[items]
    times, actions = sample.get("time.npy"), sample.get("action.npy")
    gaps = time_gap_codes(times) if times is not None else np.zeros(len(seq), dtype=np.int64)
    return seq, gaps, actions if actions is not None else np.zeros(len(seq), dtype=np.int64)


def training_sequence(sample: dict, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(items, time-gap codes, action codes, targets to leave out) of a training sample, cropped to
    its newest `max_len + 1` items (SASRec style). A sample written by `prepare --append` carries
    older items as history only (json `first_target`): the targets before it are left out."""
    parts = events_of(sample, "seq.npy")
    full = len(parts[0])
    cropped = tuple(part[-(max_len + 1):] for part in parts)
    first = sample["json"].get("first_target", 1)
    return (*cropped, max(0, first - 1 - (full - len(cropped[0]))))


def collate_training(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]) -> tuple[Histories, torch.Tensor]:
    """Each sequence s trains every next-item position: inputs s[:-1] (with their codes), targets s[1:]
    (-1, left out, for the first `masked` of them)."""
    targets = [np.r_[np.full(min(masked, len(items) - 1), -1), items[1 + masked:]] for items, _, _, masked in seqs]
    return pad_histories(*([part[:-1] for part in parts] for parts in list(zip(*seqs))[:3])), pad_left(targets)


class TrainSequences(IterableDataset):
    """Training batches of one rank in one epoch (`epoch`: it seeds the shard order and shuffles).

    `resample`: each of the rank's worker streams draws shards with replacement (seeded by seed,
    epoch, rank and worker), so any shard count works. Otherwise the shards, in an order that is the
    same on every rank and changes per epoch, are dealt to the `world_size * workers` streams
    round-robin; this needs at least one shard per stream. `batches_per_epoch` (per rank): when set,
    each stream repeats its shards as needed and stops after its share of that many batches, so all
    ranks step in lockstep; when None (one rank, no resampling), an epoch is one exact pass.
    `replay` (for `twotower update`): sequences not of round `new_round` (the newest append) are
    kept with this probability (drawn afresh each epoch); None keeps every sequence. `reader`: how shards are read and what a
    fault does (`datamodules.shards.split_reader`; default: raise, naming file and member)."""

    def __init__(self, urls: list[str], max_len: int, batch_size: int, shuffle_buffer: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, resample: bool = False,
                 batches_per_epoch: int | None = None, epoch: int = 0, replay: float | None = None,
                 reader: ShardReader | None = None, new_round: int | None = None):
        streams = world_size * max(1, num_workers)
        if not urls:
            raise DataError("no training shard to read (all missing or unreadable; see the faults above)")
        if not resample and len(urls) < streams:
            raise ValueError(f"{len(urls)} training shard(s) for {world_size} rank(s) x {max(1, num_workers)} worker(s): "
                             "every stream needs its own shard; set data.resample=true, or fewer data.num_workers, "
                             "or smaller shards (data.shard_max_count) and prepare again")
        self.urls, self.max_len, self.batch_size = urls, max_len, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.resample = rank, world_size, resample
        self.batches_per_epoch = batches_per_epoch
        self.epoch = epoch
        self.replay, self.new_round = replay, new_round
        self.skip = 0
        "Batches of this epoch already trained (a run resumed mid-epoch): the stream leaves them out."
        self.reader = reader or ShardReader("train", Faults("raise"), ("seq.npy",))

    def is_new(self, sample: dict) -> bool:
        """Whether a training sample is of the newest append (shards of an older twotower mark it `new`)."""
        meta = sample["json"]
        return meta["round"] == self.new_round if "round" in meta else meta.get("new", True)

    def _shards(self, epoch: int, stream: int, streams: int):
        """URLs (as WebDataset source dicts) this stream reads this epoch."""
        if self.resample:
            rng = random.Random(f"resample/{self.seed}/{epoch}/{stream}")
            urls = (rng.choice(self.urls) for _ in itertools.count())
        else:
            order = list(self.urls)
            random.Random(f"order/{self.seed}/{epoch}").shuffle(order)  # the same order on every rank
            mine = order[stream::streams]
            urls = itertools.cycle(mine) if self.batches_per_epoch is not None else iter(mine)
        return ({"url": url} for url in urls)

    def __iter__(self):
        epoch = self.epoch  # one instance per epoch: Lightning may iterate it twice (see train_dataloader)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = self.rank * workers + worker, self.world_size * workers
        replay = random.Random(f"replay/{self.seed}/{epoch}/{stream}")
        drawn: set[str] = set()  # shards drawn since the last usable sample

        def sources():
            """This stream's shards; an endless stream that has drawn each of them without one usable
            sample would spin forever (and its rank's peers wait forever): stop it instead."""
            for source in self._shards(epoch, stream, streams):
                if source["url"] in drawn and (not self.resample or len(drawn) == len(set(self.urls))):
                    raise DataError(f"rank {self.rank}, worker {worker}: not one usable sample in any of the "
                                    f"{len(drawn)} training shard(s) it reads (see the skipped faults above)")
                drawn.add(source["url"])
                yield source

        def usable(sample: dict) -> dict:
            drawn.clear()
            return sample

        pipeline = wds.DataPipeline(
            sources,
            *self.reader.stages(),  # tar -> samples -> decoded and checked, faults as data.on_error says
            wds.map(usable),
            wds.shuffle(self.shuffle_buffer, seed=hash((self.seed, epoch, stream))),
            wds.select(lambda sample: self.replay is None or self.is_new(sample) or replay.random() < self.replay),
            wds.map(lambda sample: training_sequence(sample, self.max_len)),
            wds.select(lambda seq: len(seq[0]) - 1 > seq[3]),  # at least one target left
            wds.batched(self.batch_size, collation_fn=collate_training, partial=self.batches_per_epoch is None),
        )
        # Workers of a rank share its batches; Lightning's loader interleaves them round-robin.
        skip = self.skip // workers + (worker < self.skip % workers)
        if self.batches_per_epoch is None:
            return itertools.islice(iter(pipeline), skip, None)
        share = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        return itertools.islice(iter(pipeline), skip, share)


class EvalCases(torch.utils.data.Dataset):
    """Evaluation users; `padding` extra cases with target -1 (empty history) make every rank's
    share the same length, and are skipped when metrics are summed."""

    def __init__(self, samples: list[dict], padding: int = 0):
        self.samples, self.padding = samples, padding

    def __len__(self) -> int:
        return len(self.samples) + self.padding

    def __getitem__(self, i: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
        if i >= len(self.samples):
            return (np.zeros(0, dtype=np.int64),) * 3, -1
        s = self.samples[i]
        return events_of(s, "history.npy"), s["json"]["target"]

    def collate(self, batch: list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]]) -> tuple[Histories, torch.Tensor]:
        """Whole histories, so every seen item is filtered; the model reads the newest max_len.
        Padded to the batch's longest only: padding changes no user vector (see UserTower), just work."""
        return pad_histories(*map(list, zip(*(h for h, _ in batch)))), torch.tensor([t for _, t in batch], dtype=torch.long)


class ShardDataModule(pl.LightningDataModule):
    """`window=True` (for `twotower update`): train on the sequences of users active in the newest
    appended window plus a replay share (`update.replay_fraction`) of the others, and validate on
    that window (`valid_window`)."""

    def __init__(self, cfg: Config, test_split: str = "test", window: bool = False, fault_log: str | Path | None = None):
        """`fault_log`: the folder where the training streams of every rank and worker log the
        faults they skip (`all_faults` adds them up); None: this process's own only."""
        super().__init__()
        self.cfg, self.test_split, self.window = cfg, test_split, window
        self.folder = shard_location(cfg.data.dir, cfg.data.shards_url)
        "The prepared shard set: data.dir, or data.shards_url (a URL, as a str, read through fsspec)."
        self.fault_log, self._train_faults = fault_log, None
        self.manifest = self._read_manifest()
        if window and "window" not in self.manifest:
            raise ValueError(f"{self.folder}: no appended data to update on; add it with `twotower prepare --append` "
                             "(e.g. data.since=<start of the new window>) first")
        # Faults found here are the same on every rank: rank 0 logs them.
        self.faults = Faults(cfg.data.on_error, verbose=rank_zero_only.rank == 0)
        self.urls = check_manifest(self.folder, self.manifest, self.faults)
        self.expected = shard_counts(self.folder, self.manifest)
        self._check_features()
        self.catalogue = load_catalogue(self.folder, self.manifest, cfg.data.cache_dir)
        self._cases: dict[tuple[str, int, int, int], tuple[list[dict], int]] = {}

    def _read_manifest(self) -> dict:
        """manifest.json of the shard set, local or remote (the same file either way)."""
        if not is_remote(self.folder):
            manifest = read_manifest(self.folder)
            if manifest is None:
                raise DataError(f"{self.folder}/manifest.json not found: run `twotower prepare` with the same data config (-c, data.*) first")
            return manifest
        manifest = read_json_url(member_url(self.folder, MANIFEST))
        if manifest is None:
            raise DataError(f"{member_url(self.folder, MANIFEST)} not found (data.shards_url): upload a shard set that "
                            "`twotower prepare` wrote there first (docs/data.md, Shards on object storage)")
        return manifest

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    @property
    def actions(self) -> list[str]:
        """The action values coded 1, 2, ... (manifest.json's `actions`)."""
        return self.manifest.get("actions", {}).get("values", [])

    def _check_features(self) -> None:
        """The user tower's features need shards that carry them."""
        user = self.cfg.model.user
        if user.time_gaps and self.manifest["schema_version"] < 2:
            raise DataError(f"{self.folder}: prepared without per-event times (shard schema {self.manifest['schema_version']}), "
                            "which model.user.time_gaps=true needs; prepare it again (twotower prepare --force)")
        if user.actions and not self.actions:
            raise DataError(f"{self.folder}: no action codes (data.actions={self.cfg.data.actions} found no event or rating "
                            "column to read them from), which model.user.actions=true needs; set model.user.actions=false")

    def cases(self, split: str) -> list[dict]:
        """Every case of `split` (one process's view: the popularity baseline, tests, benchmarks)."""
        return self.share(split)[0]

    def share(self, split: str, rank: int = 0, world_size: int = 1, limit: int = 0) -> tuple[list[dict], int]:
        """(rank's cases of `split`, how many cases the split holds): of the first `limit` cases
        (0: all), those at positions rank, rank + W, ... Every case is read and checked, but only
        the rank's share is kept, so a rank's memory for evaluation is 1/W of the split's."""
        key = (split, rank, world_size, limit)
        if split not in self.urls:
            raise DataError(self.missing_split(split))
        if key not in self._cases:
            reader = split_reader(split, self.faults, self.expected, self.num_items)
            mine, total = [], 0
            for position, case in enumerate(iter_all(self.urls[split], reader)):
                if limit and position >= limit:
                    continue  # read on: a damaged case past the limit still counts as a fault
                total += 1
                if position % world_size == rank:
                    mine.append(case)
            self._cases[key] = (mine, total)
        return self._cases[key]

    def missing_split(self, split: str) -> str:
        """Why the prepared folder has no `split`: the message to stop with."""
        if split == "cold_valid":
            return (f"{self.folder}: no cold_valid split: prepared before the held-out items were cut into cold_valid and "
                    "cold (all held-out items' cases are in cold); prepare it again (twotower prepare --force) to cut them "
                    "(split.cold_valid_share)")
        if split.endswith("_window"):
            return f"{self.folder}: no {split} split: it comes with `twotower prepare --append` (data.since=<start of the window>)"
        return f"{self.folder}: no {split} split (manifest.json lists {', '.join(sorted(self.urls))})"

    def _limit(self, split: str) -> int:
        return self.cfg.trainer.limit_val_users if split in ("valid", "valid_window") else 0

    def setup(self, stage: str) -> None:
        """Before training (every rank), read the evaluation splits the run will use: a damaged
        one then stops it (data.on_error=raise) before the first step, not after the last."""
        if stage == "fit":
            for split in {"valid_window" if self.window else "valid", self.test_split, "cold_valid", "cold"} & set(self.urls):
                self.share(split, *self._rank(), self._limit(split))

    def all_faults(self) -> list[Fault]:
        """Every fault skipped so far (data.on_error=skip), once each: those of the shard check and
        the evaluation splits (alike on every rank) and those of the training streams of every
        rank and worker (from `fault_log`)."""
        found = list(self.faults.recorded.values())
        if self.fault_log is not None:
            found += read_fault_logs(self.fault_log)
        elif self._train_faults is not None:
            found += list(self._train_faults.recorded.values())
        return list({(f.shard, f.member, f.kind): f for f in found}.values())

    def fault_report(self) -> tuple[dict[str, int], list[dict]]:
        """summary.json's `data/` counts (`fault_counts`) and data_faults.json's list, one entry per fault."""
        faults = self.all_faults()
        return fault_counts(faults), [{**asdict(f), "message": str(f)} for f in faults]

    def forget_faults(self) -> None:
        """A fresh run (not a resumed one) starts without the faults an earlier run in the same
        folder logged. Call on every rank before training; global rank 0 clears the log."""
        if self.fault_log is not None and rank_zero_only.rank == 0:
            shutil.rmtree(self.fault_log, ignore_errors=True)

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) of the Trainer this module is attached to; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _replay(self) -> tuple[float | None, int]:
        """(keep probability of sequences not marked new, or None: all; expected sequences per epoch)."""
        counts = self.manifest["counts"]
        users = counts.get("train_samples", counts["train_users"])  # the training sequences
        if not self.window:
            return None, users
        new = self.manifest["window"]["new_users"]
        share = self.cfg.update.replay_fraction
        wanted = new * share / (1 - share)  # replayed / (new + replayed) = share
        keep = min(1.0, wanted / max(users - new, 1))
        return keep, max(1, round(new + keep * (users - new)))

    def train_dataset(self, rank: int = 0, world_size: int = 1, epoch: int = 0) -> TrainSequences:
        data = self.cfg.data
        resample = data.resample if data.resample is not None else world_size > 1
        replay, sequences = self._replay()
        batches = None
        if world_size > 1 or resample:
            # One epoch ~ every training user once over all ranks, rounded up to whole batches.
            batches = max(1, math.ceil(sequences / (data.batch_size * world_size)))
        # One record of what this process skipped, however often the loader is rebuilt (each fault logged once).
        self._train_faults = self._train_faults or Faults(data.on_error, self.fault_log)
        reader = split_reader("train", self._train_faults, self.expected, self.num_items)
        return TrainSequences(self.urls["train"], data.max_len,
                              data.batch_size, data.shuffle_buffer, self.cfg.seed, rank, world_size, data.num_workers,
                              resample, batches, epoch, replay, reader,
                              self.manifest["window"]["round"] if self.window else None)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        # Built anew each epoch (`reload_dataloaders_every_n_epochs=1`, see `trainers.fit.build_trainer`),
        # so the stream's epoch, hence its shuffles, is the trainer's, also right after a resume.
        trainer = getattr(self, "trainer", None)
        dataset = self.train_dataset(rank, world_size, trainer.current_epoch if trainer is not None else 0)
        if trainer is not None:
            loop = trainer.fit_loop
            if loop.restarting and loop.epoch_progress.total.processed < loop.epoch_progress.total.started:
                dataset.skip = loop.epoch_loop.batch_progress.current.completed  # resumed from a mid-epoch checkpoint
        return DataLoader(dataset, batch_size=None, num_workers=self.cfg.data.num_workers)

    def eval_dataloader(self, split: str, limit: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Users of `split` (the first `limit`, 0: all); rank r of W gets users r, r+W, ... padded
        so that every rank has ceil(n / W) of them (see `EvalCases`)."""
        mine, total = self.share(split, rank, world_size, limit)
        dataset = EvalCases(mine, padding=math.ceil(total / world_size) - len(mine))
        return DataLoader(dataset, batch_size=self.cfg.data.eval_batch_size, collate_fn=dataset.collate)

    def val_dataloader(self) -> DataLoader:
        split = "valid_window" if self.window else "valid"
        return self.eval_dataloader(split, self._limit(split), *self._rank())

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_split, 0, *self._rank())
