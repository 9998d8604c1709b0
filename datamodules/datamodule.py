"""Reading prepared shards for training and evaluation (a `LightningDataModule`).

Training streams user sequences from tar shards: shards are split by node and by worker, shuffled
with a buffer whose seed changes every epoch and differs per rank and worker, cropped to the
newest `max_len + 1` items (SASRec style) and batched. Evaluation cases and the item catalogue are
small and are read whole."""
from __future__ import annotations

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


def pad_left(seqs: list[np.ndarray], length: int | None = None) -> torch.Tensor:
    """[B, L] long, newest item last, -1 where there is none; sequences longer than L keep their end."""
    length = length or max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), length), -1, dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = seq[-length:]
        if len(seq):
            out[row, length - len(seq):] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    return out


def collate_training(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence s trains every next-item position: inputs s[:-1], targets s[1:]."""
    return pad_left([s[:-1] for s in seqs]), pad_left([s[1:] for s in seqs])


class TrainSequences(IterableDataset):
    """One pass over the training shards per epoch, reshuffled each epoch."""

    def __init__(self, urls: list[str], max_len: int, batch_size: int, shuffle_buffer: int, seed: int):
        self.urls, self.max_len, self.batch_size = urls, max_len, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        urls = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)  # the same shard order on every rank
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        worker = get_worker_info().id if get_worker_info() else 0
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, seed=hash((self.seed, epoch, rank, worker))),
            wds.decode(),
            wds.map(lambda sample: sample["seq.npy"][-(self.max_len + 1):]),
            wds.select(lambda seq: len(seq) >= 2),
            wds.batched(self.batch_size, collation_fn=collate_training, partial=True),
        )
        return iter(pipeline)


class EvalCases(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict], max_len: int):
        self.samples, self.max_len = samples, max_len

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        s = self.samples[i]
        return s["history.npy"][-self.max_len:], s["json"]["target"]

    def collate(self, batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_left([h for h, _ in batch], self.max_len), torch.tensor([t for _, t in batch], dtype=torch.long)


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, cfg: Config, test_split: str = "test"):
        super().__init__()
        self.cfg, self.folder, self.test_split = cfg, Path(cfg.data.dir), test_split
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            raise FileNotFoundError(f"{self.folder}/manifest.json not found: run `twotower prepare` with the same data config first")
        self.catalogue = load_catalogue(self.folder, self.manifest)
        self._cases: dict[str, list[dict]] = {}

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    def cases(self, split: str) -> list[dict]:
        if split not in self._cases:
            self._cases[split] = read_all([str(self.folder / s) for s in self.manifest["shards"][split]])
        return self._cases[split]

    def train_dataloader(self) -> DataLoader:
        data = self.cfg.data
        dataset = TrainSequences([str(self.folder / s) for s in self.manifest["shards"]["train"]],
                                 data.max_len, data.batch_size, data.shuffle_buffer, self.cfg.seed)
        return DataLoader(dataset, batch_size=None, num_workers=data.num_workers, persistent_workers=data.num_workers > 0)

    def eval_dataloader(self, split: str, limit: int = 0) -> DataLoader:
        cases = self.cases(split)
        dataset = EvalCases(cases[:limit] if limit else cases, self.cfg.data.max_len)
        return DataLoader(dataset, batch_size=self.cfg.data.eval_batch_size, collate_fn=dataset.collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("valid", self.cfg.trainer.limit_val_users)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_split)
