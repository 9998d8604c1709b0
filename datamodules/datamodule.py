"""Reading prepared shards for training and evaluation (a `LightningDataModule`).

Training streams user sequences from tar shards, cropped to the newest `max_len + 1` items (SASRec
style) and batched. Every (rank, worker) stream has its own shards and its own shuffle seed, which
also changes every epoch. Under DDP/DeepSpeed every rank must run exactly the same number of steps
or the gradient all-reduce hangs, so with more than one rank each stream is endless (shards drawn
with replacement, or its own share of shards cycled) and is cut at a fixed number of batches, the
same on every rank (open_clip's `with_epoch`). Evaluation cases and the item catalogue are small
and are read whole; each rank ranks a disjoint share of the users, padded to equal batch counts."""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from configs.schema import Config
from datamodules.prepare import read_manifest
from datamodules.sequences import pad_left
from datamodules.shards import read_all


@dataclass
class Catalogue:
    item_ids: list[str]
    texts: list[str]
    tokens: torch.Tensor
    "[N, T] token ids, right-padded with 0."
    lengths: torch.Tensor
    "[N] token counts."
    train_counts: torch.Tensor
    "[N] occurrences in training sequences."
    cold: torch.Tensor
    "[N] bool: held out of training."

    def __len__(self) -> int:
        return len(self.item_ids)


def load_catalogue(folder: Path, manifest: dict) -> Catalogue:
    samples = read_all([str(folder / s) for s in manifest["shards"]["items"]])
    if len(samples) != manifest["counts"]["items"]:
        raise ValueError(f"{folder}: manifest says {manifest['counts']['items']} items, the item shards hold {len(samples)}")
    samples.sort(key=lambda s: s["json"]["index"])
    lengths = torch.tensor([len(s["tokens.npy"]) for s in samples], dtype=torch.long)
    tokens = torch.zeros(len(samples), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, : len(s["tokens.npy"])] = torch.from_numpy(s["tokens.npy"].astype(np.int64))
    return Catalogue(
        item_ids=[s["json"]["item_id"] for s in samples],
        texts=[s["txt"] for s in samples],
        tokens=tokens,
        lengths=lengths,
        train_counts=torch.tensor([s["json"]["train_count"] for s in samples], dtype=torch.long),
        cold=torch.tensor([s["json"]["cold"] for s in samples], dtype=torch.bool),
    )


def collate_training(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence s trains every next-item position: inputs s[:-1], targets s[1:]."""
    return pad_left([s[:-1] for s in seqs]), pad_left([s[1:] for s in seqs])


class TrainSequences(IterableDataset):
    """Training batches of one rank; one `iter()` per epoch.

    `resample`: each of the rank's worker streams draws shards with replacement (seeded by seed,
    epoch, rank and worker), so any shard count works. Otherwise the shards, in an order that is the
    same on every rank and changes per epoch, are dealt to the `world_size * workers` streams
    round-robin; this needs at least one shard per stream. `batches_per_epoch` (per rank): when set,
    each stream repeats its shards as needed and stops after its share of that many batches, so all
    ranks step in lockstep; when None (one rank, no resampling), an epoch is one exact pass.
    `replay` (for `twotower update`): sequences not marked new are kept with this probability
    (drawn afresh each epoch); None keeps every sequence."""

    def __init__(self, urls: list[str], max_len: int, batch_size: int, shuffle_buffer: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, resample: bool = False,
                 batches_per_epoch: int | None = None, epoch: int = 0, replay: float | None = None):
        streams = world_size * max(1, num_workers)
        if not resample and len(urls) < streams:
            raise ValueError(f"{len(urls)} training shard(s) for {world_size} rank(s) x {max(1, num_workers)} worker(s): "
                             "every stream needs its own shard; set data.resample=true, or fewer data.num_workers, "
                             "or smaller shards (data.shard_max_count) and prepare again")
        self.urls, self.max_len, self.batch_size = urls, max_len, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.resample = rank, world_size, resample
        self.batches_per_epoch = batches_per_epoch
        self.epoch = epoch
        self.replay = replay

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
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = self.rank * workers + worker, self.world_size * workers
        replay = random.Random(f"replay/{self.seed}/{epoch}/{stream}")
        pipeline = wds.DataPipeline(
            lambda: self._shards(epoch, stream, streams),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, seed=hash((self.seed, epoch, stream))),
            wds.decode(),
            wds.select(lambda sample: self.replay is None or sample["json"].get("new", True) or replay.random() < self.replay),
            wds.map(lambda sample: sample["seq.npy"][-(self.max_len + 1):]),
            wds.select(lambda seq: len(seq) >= 2),
            wds.batched(self.batch_size, collation_fn=collate_training, partial=self.batches_per_epoch is None),
        )
        if self.batches_per_epoch is None:
            return iter(pipeline)
        # Workers of a rank share its batches; Lightning's loader interleaves them round-robin.
        share = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        return itertools.islice(iter(pipeline), share)


class EvalCases(torch.utils.data.Dataset):
    """Evaluation users; `padding` extra cases with target -1 (empty history) make every rank's
    share the same length, and are skipped when metrics are summed."""

    def __init__(self, samples: list[dict], max_len: int, padding: int = 0):
        self.samples, self.max_len, self.padding = samples, max_len, padding

    def __len__(self) -> int:
        return len(self.samples) + self.padding

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if i >= len(self.samples):
            return np.zeros(0, dtype=np.int64), -1
        s = self.samples[i]
        return s["history.npy"], s["json"]["target"]

    def collate(self, batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole histories, so every seen item is filtered; the model reads the newest max_len."""
        width = max([self.max_len] + [len(h) for h, _ in batch])
        return pad_left([h for h, _ in batch], width), torch.tensor([t for _, t in batch], dtype=torch.long)


class ShardDataModule(pl.LightningDataModule):
    """`window=True` (for `twotower update`): train on the sequences of users active in the newest
    appended window plus a replay share (`update.replay_fraction`) of the others, and validate on
    that window (`valid_window`)."""

    def __init__(self, cfg: Config, test_split: str = "test", window: bool = False):
        super().__init__()
        self.cfg, self.folder, self.test_split, self.window = cfg, Path(cfg.data.dir), test_split, window
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            raise FileNotFoundError(f"{self.folder}/manifest.json not found: run `twotower prepare` with the same data config first")
        if window and "window" not in self.manifest:
            raise ValueError(f"{self.folder}: no appended data to update on; add it with `twotower prepare --append` "
                             "(e.g. data.since=<start of the new window>) first")
        self.catalogue = load_catalogue(self.folder, self.manifest)
        self._cases: dict[str, list[dict]] = {}

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    def cases(self, split: str) -> list[dict]:
        if split not in self._cases:
            self._cases[split] = read_all([str(self.folder / s) for s in self.manifest["shards"][split]])
        return self._cases[split]

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) of the Trainer this module is attached to; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _replay(self) -> tuple[float | None, int]:
        """(keep probability of sequences not marked new, or None: all; expected sequences per epoch)."""
        users = self.manifest["counts"]["train_users"]
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
        return TrainSequences([str(self.folder / s) for s in self.manifest["shards"]["train"]], data.max_len,
                              data.batch_size, data.shuffle_buffer, self.cfg.seed, rank, world_size, data.num_workers,
                              resample, batches, epoch, replay)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        # Lightning restores a checkpoint before it asks for the loader: a resumed run starts at the
        # epoch (hence the shuffles) where the interrupted one stopped.
        epoch = self.trainer.current_epoch if getattr(self, "trainer", None) is not None else 0
        dataset = self.train_dataset(rank, world_size, epoch)
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def eval_dataloader(self, split: str, limit: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Users of `split` (the first `limit`, 0: all); rank r of W gets users r, r+W, ... padded
        so that every rank has ceil(n / W) of them (see `EvalCases`)."""
        cases = self.cases(split)
        cases = cases[:limit] if limit else cases
        mine = cases[rank::world_size]
        dataset = EvalCases(mine, self.cfg.data.max_len, padding=math.ceil(len(cases) / world_size) - len(mine))
        return DataLoader(dataset, batch_size=self.cfg.data.eval_batch_size, collate_fn=dataset.collate)

    def val_dataloader(self) -> DataLoader:
        split = "valid_window" if self.window else "valid"
        return self.eval_dataloader(split, self.cfg.trainer.limit_val_users, *self._rank())

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_split, 0, *self._rank())
