"""`twotower learn` (docs/learn.md): a continuous learner. It follows the event stream (`stream.url`) from the
offsets it last committed and keeps training a checkpoint on what users do now:

    twotower learn --checkpoint runs/x/checkpoints/best.ckpt --export runs/x/export stream.url=/srv/stream

Each step reads up to `learn.step_events` new events (after the items added before them), trains
one optimizer step on the sequences of the users who had them, each new event the target of
exactly this step (the user's earlier interactions are its history), plus a replay share of
other users' older interactions against forgetting; items new on the stream are added to the
catalogue at once (their text vector needs nothing; an ID embedding row starts fresh and learns
from their events). Every `learn.commit_every_*` the weights, the optimizer and the stream offsets
are committed together (state.pt, written whole and renamed), after the events and items learnt
since are written as Parquet parts (`learn.dir`/events, /items) that `prepare` reads: a kill at
any moment resumes from the last commit, the events after it are learnt again by the restored
weights, so no event is lost or learnt twice. Every `learn.export_every_*` it commits, then
publishes an export that a `serve` on that folder swaps in.

Under torchrun (WORLD_SIZE > 1) rank 0 reads the stream and broadcasts each step's records; each
rank trains the users hashed to it, gradients are summed over ranks weighted by target count, and
a rank with nothing new still takes part (with zero weight), so none waits on another."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import zlib
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from twotower.configs import Config, to_yaml
from twotower.datamodules.datamodule import ShardDataModule, collate_training
from twotower.datamodules.prepare import action_codes, event_tables
from twotower.files import atomic_file, write_json, write_text
from twotower.modules.item_text import load_tokenizer, tokenize
from twotower.modules.lit_two_tower import TwoTowerModule, step_seed
from twotower.serving.export_format import Exported, write_exported
from twotower.serving.item_index import build_index
from twotower.streaming import Record, open_stream
from twotower.trainers.evaluate import load_module
from twotower.trainers.stream_records import (
    Event,
    SkipLog,
    Skipped,
    UserHistories,
    parse_event,
    parse_item,
)

log = logging.getLogger("twotower.learn")

STATE = "state.pt"


def user_rank(user: str, world: int) -> int:
    """The rank that trains `user` (a stable hash: the same on every rank and every restart)."""
    return zlib.crc32(user.encode()) % world


def _broadcast(value):
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class Learner:
    """The state of a continuous learner: model, optimizer, histories, stream offsets, and what
    it learnt since its last commit."""

    def __init__(self, cfg: Config, checkpoint: str, export_to: str | Path | None = None):
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.stream.url is None:
            raise ValueError("twotower learn needs the event stream: set stream.url (a folder, or redis://HOST:PORT/DB)")
        self.cfg, self.checkpoint = cfg, str(Path(checkpoint).resolve())
        self.export_to = Path(export_to) if export_to else None
        self.dir = Path(cfg.learn.dir)
        self.stream = open_stream(cfg.stream.url, cfg.stream.segment_bytes) if self.rank == 0 else None
        data = ShardDataModule(cfg)
        self.module: TwoTowerModule = load_module(checkpoint, data, cfg, new_items=True).train()
        if cfg.learn.dropout is not None:
            self.module.model.user_tower.set_dropout(cfg.learn.dropout)
        if self.world > 1:  # each rank's own candidates: the batches differ in size, and may be empty
            model = self.module.cfg.model
            loss = replace(model.loss, local_loss=True)
            tower = self.module.model.item_tower
            if tower.encoder is not None and not tower.caches_pooled:  # encoder layers run per item
                # The full softmax would encode the catalogue (or re-encode its stale table) split
                # across ranks, a collective that a rank with nothing new in a step never joins.
                loss = replace(loss, candidates="sampled")
            self.module.cfg = replace(self.module.cfg, model=replace(model, loss=loss))
        self.model_cfg = self.module.cfg
        self.fields = list(cfg.data.text_fields)
        self.item_ids = list(data.catalogue.item_ids)
        self.texts = list(data.catalogue.texts)
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.action_values = list(data.actions)
        self.actions = {value: code for code, value in enumerate(self.action_values, start=1)}
        self.tokenizer = load_tokenizer(self.model_cfg.model.item.encoder) if self.module.model.item_tower.uses_text else None
        self.new_items: list[dict] = []
        "Items added from the stream, in order (item_id + text fields): part of the state."
        self.histories = UserHistories()
        self._load_prepared(data)
        self.module.model.item_tower.build_frozen_cache(self.model_cfg.eval.item_batch_size)
        self.optimizer, self.schedule = self._optimizers()
        self.step, self.commits, self.offsets = 0, 0, {"events": None, "items": None}
        self.committed_offsets = dict(self.offsets)
        self.learnt = {"events": 0, "targets": 0, "context": 0, "replayed": 0, "skipped_steps": 0}
        self.skips = SkipLog()
        self.pending_events: list[dict] = []
        self.pending_items: list[dict] = []
        self._resume()
        self.own_users = [u for u in self.histories.users() if user_rank(u, self.world) == self.rank]
        "The users this rank trains, in order of their first interaction (replay draws from them)."

    # ---- start-up -----------------------------------------------------------------------------
    def _load_prepared(self, data: ShardDataModule) -> None:
        """Every prepared interaction, in time order, as the users' histories so far."""
        tables = [pd.read_parquet(data.folder / name) for name in event_tables(data.manifest)]
        events = pd.concat(tables, ignore_index=True).sort_values("timestamp", kind="stable")
        codes, _, _ = action_codes(events, self.cfg.data, self.action_values) if self.action_values else (np.zeros(len(events), np.int16), [], None)
        codes = np.where(codes <= len(self.action_values), codes, 0)
        items = events["item_id"].astype(str).map(self.item_index)
        self.histories.add_many(events["user_id"].astype(str), items.to_numpy(), events["timestamp"].to_numpy(np.float64), codes)

    def _optimizers(self):
        lr = self.cfg.learn.lr or self.cfg.trainer.lr
        self.module.cfg = replace(self.module.cfg, trainer=replace(self.module.cfg.trainer, lr=lr))
        configured = self.module.configure_optimizers()
        return configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    def _resume(self) -> None:
        """Continue from `learn.dir`/state.pt when there is one: the items it had added, its weights,
        optimizer and offsets, and the events it learnt as history; parts written after it (by a
        run killed before it committed them) are removed."""
        path = self.dir / STATE
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        self._add_items(state["new_items"])
        self.module.load_state_dict(state["model"])
        self.module.load_stale_state(state.get("stale"))  # absent from states written before it existed
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.commits, self.offsets = state["step"], state["commits"], state["offsets"]
        self.committed_offsets = dict(self.offsets)
        self.learnt, self.skips.counts = state["learnt"], state["skipped"]
        for kind in ("events", "items"):
            for part in sorted((self.dir / kind).glob("part-c*.parquet")):
                if int(part.stem.removeprefix("part-c")) > self.commits:
                    if self.rank == 0:
                        part.unlink()
                elif kind == "events":
                    table = pd.read_parquet(part)
                    self.histories.add_many(table["user_id"], table["item_id"].map(self.item_index).to_numpy(),
                                            table["timestamp"].to_numpy(np.float64), table["code"].to_numpy())
        log.info(f"resumed from {path}: step {self.step}, commit {self.commits}, {len(self.new_items)} items added, "
                 f"{self.learnt['events']} events learnt")

    # ---- the catalogue grows ------------------------------------------------------------------
    def _add_items(self, records: list[dict]) -> None:
        """Append items (item_id + text fields) to the catalogue: tokens, frozen cache rows, a fresh
        ID embedding row each (its optimizer moments zero; with a new-item head, the row that makes
        the item's vector the head's, where serving put it, and it trains on from there),
        popularity and negatives."""
        if not records:
            return
        module, tower = self.module, self.module.model.item_tower
        texts = [parse_item(r, self.fields, {})[2] for r in records]
        n, added = len(self.item_ids), len(records)
        if tower.uses_text:
            tokens = [torch.from_numpy(t) for t in tokenize(self.tokenizer, texts, self.cfg.data.max_text_len)]
            lengths = torch.tensor([len(t) for t in tokens])
            tower.append_catalogue(nn.utils.rnn.pad_sequence(tokens, batch_first=True), lengths)
        else:  # id mode: no text to read, but the catalogue tensors keep one row per item
            tower.append_catalogue(torch.zeros(added, 1, dtype=torch.int32), torch.zeros(added, dtype=torch.long))
        if tower.id_embedding is not None:
            old = tower.id_embedding.weight
            if tower.cold_head is not None:
                fresh = tower.new_item_rows(torch.arange(n, n + added)).to(old.dtype)
            else:
                seeded = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + n)  # the same rows in a rerun
                fresh = torch.empty(added, old.shape[1], dtype=old.dtype).normal_(std=self.model_cfg.model.item.id_init_std, generator=seeded)
            grown = nn.Parameter(torch.cat([old.detach(), fresh]))
            tower.id_embedding.weight, tower.id_embedding.num_embeddings = grown, n + added
            for group in self.optimizer.param_groups:
                group["params"] = [grown if p is old else p for p in group["params"]]
            moments = self.optimizer.state.pop(old, None)
            if moments:  # AdamW's moments of the new rows start at zero, as a fresh parameter's do
                self.optimizer.state[grown] = {k: torch.cat([v, v.new_zeros(added, *v.shape[1:])]) if v.dim() else v
                                               for k, v in moments.items()}
        module.model.num_items = n + added
        module.item_counts = torch.cat([module.item_counts, torch.ones(added, dtype=module.item_counts.dtype)])
        module.count_total += added
        module.eligible = torch.cat([module.eligible, torch.arange(n, n + added)])
        for record, text in zip(records, texts):
            self.item_index[record["item_id"]] = len(self.item_ids)
            self.item_ids.append(record["item_id"])
            self.texts.append(text)
        self.new_items += records

    # ---- one step -----------------------------------------------------------------------------
    def _fetch(self) -> tuple[list[Record], list[Record]]:
        """(new events, new items) after the committed offsets; read by rank 0 and broadcast. The
        events first: an item an event refers to was added before the event was, so reading the
        items after the events finds it."""
        fetched = None
        if self.rank == 0:
            wanted = self.cfg.learn.step_events
            events = self.stream.read("events", self.offsets["events"], wanted)
            deadline = time.monotonic() + self.cfg.learn.step_wait_s
            while events and len(events) < wanted and time.monotonic() < deadline:  # fill the step (learn.step_wait_s)
                time.sleep(min(self.cfg.stream.poll_interval_s, max(0.0, deadline - time.monotonic())))
                events += self.stream.read("events", events[-1].offset, wanted - len(events))
            items = self.stream.read("items", self.offsets["items"], 100_000)
            fetched = (events, items)
        return _broadcast(fetched)

    def _take_items(self, records: list[Record]) -> None:
        usable: dict[str, dict] = {}
        for record in records:
            try:
                item, fields, _ = parse_item(record.body, self.fields, self.item_index)
                if item in usable:
                    raise Skipped("known_item", f"item {item!r} was added earlier in this read")
                usable[item] = {"item_id": item, **fields}
            except Skipped as error:
                self.skips.skip("items", record.offset, error)
        usable = list(usable.values())
        self._add_items(usable)
        self.pending_items += usable
        if records:
            self.offsets["items"] = records[-1].offset

    def _take_events(self, records: list[Record]) -> list[Event]:
        events = []
        for record in records:
            try:
                events.append(parse_event(record.offset, record.body, self.item_index, self.actions))
            except Skipped as error:
                self.skips.skip("events", record.offset, error)
        if records:
            self.offsets["events"] = records[-1].offset
        return events

    def _sequences(self, events: list[Event], rng: np.random.Generator) -> tuple[list, int, int]:
        """(this rank's training sequences, how many new events are targets, how many replayed
        cases). A user's new events are appended to the history, and the sequence ending at the
        newest trains them as targets (a user with more than data.max_len new events in one step
        gets several sequences); a new user's first event is history only. The first new event is
        predicted from at most learn.history_len items (the last from at most data.max_len)."""
        max_len, mine, targets = self.cfg.data.max_len, [], 0
        history_len = min(self.cfg.learn.history_len or max_len, max_len)
        replay_len = min(self.cfg.learn.replay_len or max_len, max_len)
        by_user: dict[str, list[Event]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(event)
        for user, new in by_user.items():
            before = self.histories.length(user)
            for e in new:
                self.histories.add(user, e.item, e.time, e.code)
            if user_rank(user, self.world) != self.rank:
                continue
            if before == 0:
                self.own_users.append(user)
            first = max(before, 1)  # position of the first new target
            end = before + len(new)
            for start in range(first, end, max_len):
                stop = min(start + max_len, end)
                mine.append(self.histories.sequence(user, stop, min(max_len, stop - start - 1 + history_len) + 1, start))
                targets += stop - start
        replay_share = self.cfg.learn.replay_fraction
        replays = math.ceil(len(mine) * replay_share / (1 - replay_share)) if mine else 0
        replayed, old = 0, [u for u in self.own_users if u not in by_user and self.histories.length(u) >= 2]
        for user in (old[i] for i in rng.choice(len(old), min(replays, len(old)), replace=False)) if old else ():
            end = int(rng.integers(2, self.histories.length(user) + 1))
            mine.append(self.histories.sequence(user, end, replay_len + 1, 1))
            replayed += mine[-1][0].shape[0] - 1 - mine[-1][3]
        return mine, targets, replayed

    def train_step(self, events: list[Event]) -> float:
        """One optimizer step on `events` (plus replay); returns this rank's loss (nan: no sequences)."""
        torch.manual_seed(step_seed(self.cfg.seed, self.rank, self.step))
        rng = np.random.default_rng([self.cfg.seed, self.rank, self.step])
        sequences, targets, replayed = self._sequences(events, rng)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        loss_value, weight = float("nan"), float(targets + replayed)
        if sequences:
            loss = self.module.loss(*collate_training(sequences))
            loss.backward()
            loss_value = float(loss.detach())
        if self.world > 1:  # sum of each rank's mean-loss gradient weighted by its cases
            total = torch.tensor([weight], dtype=torch.float64)
            dist.all_reduce(total)
            for p in params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                grad.mul_(weight / max(float(total), 1.0))
                dist.all_reduce(grad)
                p.grad = grad
        # The norm of the summed gradients, the same on every rank: a non-finite one (a NaN or Inf
        # loss on any rank) drops the step everywhere, so it never reaches the weights or a commit.
        norm = nn.utils.clip_grad_norm_(params, self.cfg.trainer.gradient_clip_val or float("inf"))
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.learnt["skipped_steps"] += 1
            log.warning(f"step {self.step}: non-finite loss or gradients; the step is dropped ({self.learnt['skipped_steps']} so far)")
        self.schedule.step()
        self.step += 1
        self.learnt["targets"] += targets
        self.learnt["replayed"] += replayed
        return loss_value

    def _remember(self, events: list[Event], before: dict[str, int]) -> None:
        """Keep the step's events for the next commit's events part (rank 0)."""
        counts: dict[str, int] = {}
        for e in events:
            position = before.get(e.user_id, 0) + counts.get(e.user_id, 0)
            counts[e.user_id] = counts.get(e.user_id, 0) + 1
            self.pending_events.append({"user_id": e.user_id, "item_id": e.item_id, "timestamp": e.time, "event": e.action,
                                        "code": e.code, "offset": e.offset, "target": position > 0})
            self.learnt["context"] += position == 0
        self.learnt["events"] += len(events)

    # ---- commit and publish -------------------------------------------------------------------
    def commit(self) -> None:
        """Write the events and items learnt since the last commit as the next parts, then the state
        (weights, optimizer, offsets, counters) as state.pt, whole, in one rename."""
        number = self.commits + 1
        if self.rank == 0:
            if self.pending_events:
                table = pd.DataFrame(self.pending_events)
                if table["event"].isna().all():  # no action column, as in prepared data without one
                    table = table.drop(columns="event")
                with atomic_file(self.dir / "events" / f"part-c{number:06d}.parquet") as tmp:
                    table.to_parquet(tmp)
            if self.pending_items:
                with atomic_file(self.dir / "items" / f"part-c{number:06d}.parquet") as tmp:
                    pd.DataFrame(self.pending_items).to_parquet(tmp)
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "schedule": self.schedule.state_dict(), "step": self.step, "commits": number,
                     "offsets": dict(self.offsets), "new_items": self.new_items, "learnt": dict(self.learnt),
                     "skipped": self.skips.counts, "checkpoint": self.checkpoint, "stale": self.module.stale_state()}
            with atomic_file(self.dir / STATE) as tmp:
                torch.save(state, tmp)
            write_json(self.dir / "progress.json", self.progress())
        self.commits, self.pending_events, self.pending_items = number, [], []
        self.committed_offsets = dict(self.offsets)
        if dist.is_initialized():
            dist.barrier()

    def progress(self) -> dict:
        return {"step": self.step, "commits": self.commits, "offsets": self.offsets, "items": len(self.item_ids),
                "items_added": len(self.new_items), "learnt": self.learnt, "skipped": dict(self.skips.counts)}

    def learn_available(self) -> int:
        """Learn everything on the stream now: the new items, then the new events, one step per
        `learn.step_events`, until a read finds nothing; no waiting, commit or export (call
        `commit()` / `publish()` for those). Returns the events learnt. For benchmarks and tests
        that drive the learner step by step (bench/online.py)."""
        learnt = 0
        while True:
            events, read = self.step_once()
            learnt += events
            if not read:
                return learnt

    def step_once(self) -> tuple[int, bool]:
        """Fetch, take the new items, and train one step on the new events if there are any:
        (events learnt, whether any record was read)."""
        events_records, item_records = self._fetch()
        self._take_items(item_records)
        events = self._take_events(events_records)
        if events:
            before = {e.user_id: self.histories.length(e.user_id) for e in events}
            loss = self.train_step(events)
            if self.rank == 0:
                self._remember(events, before)
            if self.step % self.cfg.trainer.log_every_n_steps == 0:
                log.info(f"step {self.step}: {len(events)} events, loss {loss:.4f}, {self.learnt['targets']} targets learnt")
        return len(events), bool(events_records or item_records)

    @torch.no_grad()
    def publish(self) -> Path | None:
        """Commit, then export the current model with the whole catalogue: every rank encodes its
        share of the items (`TwoTower.catalogue_table`), rank 0 writes the folder."""
        self.commit()
        model = self.module.model
        model.eval()
        try:
            vectors = model.catalogue_vectors(self.model_cfg.eval.item_batch_size).float().cpu().contiguous()
            if self.rank != 0:
                return None
            exported = Exported(cfg=self.module.cfg, model=model, item_ids=list(self.item_ids), texts=list(self.texts),
                                vectors=vectors, index=build_index(vectors.numpy(), self.cfg.serving),
                                tokenizer=self.tokenizer, actions=self.action_values)
            out = write_exported(self.export_to, exported, str(self.dir / STATE),
                                 {"stream": {"url": self.cfg.stream.url, "offsets": dict(self.offsets),
                                             "step": self.step, "exported_at": time.time()}})
        finally:
            model.train()
        log.info(f"step {self.step}: exported {len(self.item_ids)} items to {out}")
        return out

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        lc = self.cfg.learn
        stop = {"now": False}
        def request_stop(signum, frame):
            stop["now"] = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)
        started = last_commit = last_export = last_record = time.monotonic()
        committed_step = exported_step = self.step
        while True:
            _, read = self.step_once()
            now = time.monotonic()
            if read:
                last_record = now
            idle = not read
            if idle:
                time.sleep(self.cfg.stream.poll_interval_s)
            want_stop = _broadcast(stop["now"] or (lc.max_steps and self.step >= lc.max_steps)
                                   or (lc.idle_exit_s and idle and now - last_record >= lc.idle_exit_s))
            due_export = self.export_to is not None and self.step > exported_step and (
                (lc.export_every_steps and self.step - exported_step >= lc.export_every_steps)
                or (lc.export_every_s and now - last_export >= lc.export_every_s))
            due_commit = self.offsets != self.committed_offsets and (self.step - committed_step >= lc.commit_every_steps
                                                                    or now - last_commit >= lc.commit_every_s)
            due_export, due_commit = _broadcast((bool(due_export), bool(due_commit)))
            if due_export or (want_stop and self.export_to is not None and self.step > exported_step):
                self.publish()
                last_export = last_commit = time.monotonic()
                exported_step = committed_step = self.step
            elif due_commit or (want_stop and self.offsets != self.committed_offsets):
                self.commit()
                last_commit = time.monotonic()
                committed_step = self.step
            if want_stop:
                break
        summary = {**self.progress(), "wall_s": time.monotonic() - started}
        if self.rank == 0:
            write_json(self.dir / "progress.json", self.progress())
        return summary


def init_process_group(cfg: Config) -> None:
    """Under torchrun (WORLD_SIZE > 1): a gloo (CPU) or nccl process group, with the collective timeout."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = cfg.trainer.process_group_backend or ("nccl" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))


def learn_threads(cfg: Config) -> int:
    """Torch threads `twotower learn` runs: learn.num_threads, else trainer.num_threads (0: torch's default)."""
    return cfg.learn.num_threads or cfg.trainer.num_threads


def learn(cfg: Config, checkpoint: str, export_to: str | Path | None = None) -> dict:
    """Follow the stream and learn until stopped (`learn.max_steps`, `learn.idle_exit_s`, SIGTERM)."""
    if learn_threads(cfg):
        torch.set_num_threads(learn_threads(cfg))
    init_process_group(cfg)
    learner = Learner(cfg, checkpoint, export_to)
    if learner.rank == 0:
        write_text(learner.dir / "config.yaml", to_yaml(cfg))
    try:
        return learner.run()
    finally:
        if learner.stream is not None:
            learner.stream.close()
        if dist.is_initialized():
            dist.destroy_process_group()
