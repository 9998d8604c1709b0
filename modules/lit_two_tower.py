"""The LightningModule that trains a `TwoTower`: next-item softmax over sampled or full-catalogue
candidates, full-ranking validation and test, AdamW with a lower encoder LR and warm-up."""
from __future__ import annotations

import math
import resource
import time
import warnings

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from twotower.configs.schema import Config
from twotower.modules.distributed import rank_and_world
from twotower.modules.histories import Histories
from twotower.modules.losses import cross_rank_softmax_loss, expected_draws_log, softmax_loss
from twotower.modules.metrics import metrics_per_user, target_ranks
from twotower.modules.two_tower import TwoTower

MONITOR = "val/ndcg@10"
"What early stopping, the best checkpoint and the plateau schedule follow (`validation_step`'s log)."

# `_log_ranking` logs values it has already summed over ranks itself; Lightning's advice to
# `sync_dist` would reduce them a second time.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's randomness (negatives, dropout) on one rank: distinct per
    rank (the same seed everywhere would draw the same negatives on every rank), and a function of
    the step alone, so a resumed run draws what the uninterrupted run drew."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


def micro_step(global_step: int, batch_idx: int, accumulate: int) -> int:
    """A number per micro-batch: with gradient accumulation `global_step` stays the same for the
    `accumulate` micro-batches of one optimizer step, which would otherwise all draw the same
    negatives and dropout masks. Distinct for every micro-batch of a run (the window's position is
    below `accumulate`), and restored with `global_step` and `batch_idx` on resume."""
    return global_step * accumulate + batch_idx % accumulate


def uses_full_softmax(cfg: Config, num_items: int) -> bool:
    """`auto`: the exact softmax when every item's vector is a cheap lookup (id mode, or a frozen encoder
    served from its cache) and a batch's [positions x catalogue] logits stay within full_max_logits."""
    loss, item = cfg.model.loss, cfg.model.item
    cheap_items = cfg.model.mode == "id" or (item.train_layers == 0 and item.cache_frozen)
    logits = cfg.data.batch_size * cfg.data.max_len * num_items
    return loss.candidates == "full" or (loss.candidates == "auto" and cheap_items and logits <= loss.full_max_logits)


class TwoTowerModule(pl.LightningModule):
    def __init__(self, cfg: Config, num_items: int, train_counts: torch.Tensor, cold: torch.Tensor, num_actions: int = 0):
        super().__init__()
        self.save_hyperparameters({"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "num_items": num_items,
                                   "num_actions": num_actions})
        self.cfg = cfg
        self.model = TwoTower(cfg.model, num_items, num_actions)
        self.num_items = num_items
        self._stale: torch.Tensor | None = None
        self._stale_age = 0
        "Training steps since the stale table was encoded."
        # Sampler statistics: popularity of each item, and the items negatives may be drawn from.
        # Counts, not probabilities: integer buffers keep their dtype when a strategy casts the module
        # to bf16 (DeepSpeed before 0.19 cast buffers too), and logQ needs them exact (`item_prob`).
        self.register_buffer("item_counts", train_counts.long() + 1, persistent=False)
        self.count_total = int(train_counts.sum()) + num_items
        self.register_buffer("eligible", torch.nonzero(~cold).squeeze(1), persistent=False)
        self.register_buffer("held_out", torch.nonzero(cold).squeeze(1), persistent=False)
        if self.model.item_tower.id_embedding is not None:
            # Held-out items never train, so their rows stay zero; in id+text they are ranked as
            # serving ranks an item added after training (the new-item head's vector, if any).
            self.model.item_tower.id_embedding.weight.data[cold.to(torch.bool)] = 0.0
            self.model.item_tower.untrained = cold.to("cpu", torch.bool)
        self.test_split = "test"
        "Which split `trainer.test` ranks (test or cold); also its metrics' prefix."
        self._step_started = None
        self._loss: torch.Tensor | None = None
        self._step_flagged = False
        "This step's loss or gradients were found non-finite before the optimizer step."
        self._engine_steps: int | None = None
        "DeepSpeed's optimizer-step count when last read (`_check_deepspeed_step`)."

    @property
    def full_softmax(self) -> bool:
        """Every step's candidates are the whole catalogue (`uses_full_softmax`), else sampled."""
        return uses_full_softmax(self.cfg, self.num_items)

    @property
    def refreshes(self) -> bool:
        """The full softmax's candidates read a stale pooled table, the histories fresh (`_refreshed_tables`)."""
        trains_encoder = self.model.item_tower.uses_text and self.cfg.model.item.train_layers != 0
        return self.full_softmax and trains_encoder and self.cfg.model.loss.refresh_every > 0

    @property
    def item_prob(self) -> torch.Tensor:
        """[num_items] float64: each item's share of the training events (add-one smoothed), the
        popularity sampler's probabilities that logQ corrects for."""
        return self.item_counts.double() / self.count_total

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Histories, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[1].shape[0])
        self._loss = loss.detach()  # checked for NaN/Inf once gradients are in (`_finite_step`)
        return loss

    def loss(self, inputs: Histories, targets: torch.Tensor) -> torch.Tensor:
        """The next-item softmax loss of a batch (targets -1: positions left out), over the full
        catalogue or sampled candidates (`uses_full_softmax`)."""
        positions = targets >= 0
        return (self._full_loss if self.full_softmax else self._sampled_loss)(inputs, targets, positions)

    def _full_loss(self, inputs: Histories, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Candidates: every item training may know; cold items stay out, as they do of sampled
        negatives. With several ranks and an encoder to run, each rank encodes its share of the
        catalogue and the shares are gathered, differentiably (`TwoTower.catalogue_table`); with
        `model.loss.refresh_every` the candidates read a stale table instead (`_refreshed_tables`)."""
        if self.refreshes:
            history_table, table, copies = self._refreshed_tables(inputs.items)
        else:
            table = history_table = self.model.catalogue_table()
            copies = self._text_copies(self.eligible)
        states = self.model.user_states(inputs, history_table)
        labels = torch.searchsorted(self.eligible, targets[positions])
        return softmax_loss(states[positions], table[self.eligible], labels, self.cfg.model.loss.temperature, **copies)

    def _refreshed_tables(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(the table the user tower reads, the candidates' table, `softmax_loss`'s new-item
        copies) over the stale pooled table (`model.loss.refresh_every`): the candidates read it as
        it is, so the encoder's gradient comes through the histories alone, which are encoded
        afresh (MoCo's keys and queries). Letting the gradient through the batch's own candidates
        would bias it (the pull of every positive, the push of only those negatives that happen to
        be in the batch): the loss then rose."""
        tower = self.model.item_tower
        self._refresh_stale()
        every = torch.arange(len(self._stale), device=self._stale.device)
        table, new_vectors = tower.from_pooled(every, self._stale)
        read = torch.unique(history[history >= 0])
        history_table = table.index_copy(0, read, tower(read))
        self._stale_age += 1
        return history_table, table, self._copies(None if new_vectors is None else new_vectors[self.eligible])

    def _refresh_stale(self) -> None:
        """Re-encode the stale table every `model.loss.refresh_every` steps (and when there is none,
        or the catalogue grew), without dropout: the pooled text inference would compute now."""
        tower = self.model.item_tower
        stale = self._stale
        if stale is not None and len(stale) == len(tower.lengths) and self._stale_age < self.cfg.model.loss.refresh_every:
            return
        tower.build_frozen_cache(self.cfg.eval.item_batch_size)
        was_training = tower.encoder.training
        tower.encoder.eval()
        self._stale = self.model.catalogue_pooled(self.cfg.eval.item_batch_size)
        tower.encoder.train(was_training)
        self._stale_age = 0

    def stale_state(self) -> dict | None:
        """The stale table and the steps since it was encoded, for a checkpoint: a run resumed in
        the middle of a refresh window reads the table that the uninterrupted run reads."""
        return {"table": self._stale, "age": self._stale_age} if self.refreshes else None

    def load_stale_state(self, state: dict | None) -> None:
        """Restore `stale_state` (None: none saved; the table is encoded at the next step)."""
        if state is not None and state["table"] is not None:
            self._stale, self._stale_age = state["table"].to(self.device), state["age"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stale_table"] = self.stale_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_stale_state(checkpoint.get("stale_table"))

    def _sampled_loss(self, inputs: Histories, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each distinct item of the batch (and of the sampled negatives) is encoded once; the
        user tower reads those vectors back by index, and the softmax runs over all of them."""
        loss_cfg = self.cfg.model.loss
        items = inputs.items
        in_batch = torch.cat([items[items >= 0], targets[positions]])
        negatives = self.eligible[torch.randint(len(self.eligible), (loss_cfg.num_negatives,), device=self.device)]
        distinct, vectors, history, new_vectors = self._batch_item_vectors(items, torch.cat([in_batch, negatives]))
        states = self.model.user_tower(history, items >= 0, inputs.gaps, inputs.actions)
        labels = torch.searchsorted(distinct, targets[positions])
        cold = self._copies(new_vectors)
        if rank_and_world()[1] > 1 and not loss_cfg.local_loss:
            return cross_rank_softmax_loss(states[positions], vectors, labels, distinct, loss_cfg.temperature,
                                           self.item_prob if loss_cfg.logq else None, len(in_batch),
                                           loss_cfg.num_negatives, len(self.eligible), **cold)
        log_q = None
        if loss_cfg.logq:
            log_q = expected_draws_log(self.item_prob[distinct], len(in_batch), loss_cfg.num_negatives, len(self.eligible))
        return softmax_loss(states[positions], vectors, labels, loss_cfg.temperature,
                            log_q.to(vectors.dtype) if log_q is not None else None, **cold)

    def _text_copies(self, candidates: torch.Tensor) -> dict:
        """`softmax_loss`'s text-only copies of the candidates (item indices) and their weight,
        with `model.loss.cold_weight` in id+text (the item tower then has a new-item head); else nothing."""
        tower = self.model.item_tower
        return self._copies(None if tower.cold_head is None else tower(candidates, text_only=True))

    def _copies(self, new_vectors: torch.Tensor | None) -> dict:
        """`softmax_loss`'s keywords for the candidates' new-item vectors (None: no new-item head)."""
        return {} if new_vectors is None else {"text_candidates": new_vectors, "text_weight": self.cfg.model.loss.cold_weight}

    def _encode(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(vectors, new-item vectors or None) of `items`: with a new-item head both come from one
        encoder pass, so trainable encoder layers run once per step, not twice."""
        tower = self.model.item_tower
        return tower.from_pooled(items, tower.pooled(items)) if tower.cold_head is not None else (tower(items), None)

    def _batch_item_vectors(self, inputs: torch.Tensor, occurrences: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(distinct items, their vectors, the history's vectors [B, L, d], the distinct items'
        new-item vectors or None without a new-item head); `occurrences` are the history's items
        (row-major, padding left out), then targets, then negatives.
        `model.item.dedup=false` encodes every occurrence (the naive recipe): the history reads its
        own copies and the candidates are each distinct item's first copy. Every copy is the same
        function of the weights, so the loss and the summed gradients equal the dedup path's
        (up to dropout, which draws a different mask per copy)."""
        if self.cfg.model.item.dedup:
            distinct = torch.unique(occurrences)
            vectors, new_vectors = self._encode(distinct)
            return distinct, vectors, vectors[torch.searchsorted(distinct, inputs.clamp_min(0))], new_vectors
        valid = inputs >= 0
        encoded, new_vectors = self._encode(occurrences)
        distinct, inverse = torch.unique(occurrences, return_inverse=True)
        order = torch.arange(len(occurrences), device=occurrences.device)
        first = torch.full_like(distinct, len(occurrences)).scatter_reduce_(0, inverse, order, "amin")
        history = encoded.new_zeros(*inputs.shape, encoded.shape[-1])  # padding: zero (the user tower masks it)
        history[valid] = encoded[: int(valid.sum())]
        return distinct, encoded[first], history, None if new_vectors is None else new_vectors[first]

    def on_fit_start(self) -> None:
        self.model.item_tower.build_frozen_cache(self.cfg.eval.item_batch_size)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        step = micro_step(self.global_step, batch_idx, self.trainer.accumulate_grad_batches)
        torch.manual_seed(step_seed(self.cfg.seed, self.global_rank, step))
        self._step_flagged = False
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sequences = batch[1].shape[0]
        metrics = {"train/samples_per_s": sequences / elapsed, "train/peak_rss_mb": rss_mb}  # per device (rank)
        if self.device.type == "cuda":
            metrics["train/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.log_dict(metrics, batch_size=sequences)
        self._check_deepspeed_step()

    def _check_deepspeed_step(self) -> None:
        """Under DeepSpeed ZeRO parameters have no `.grad` (the gradients live in its partitions), so
        `on_before_optimizer_step` sees none. DeepSpeed's own step computes their global norm and
        skips (leaves every weight and moment as it was) a step whose norm is not finite; read it
        after the step: log it as `train/grad_norm`, and apply `trainer.on_nan` to a skipped one."""
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is None or engine.global_steps == self._engine_steps:  # no optimizer step (accumulating)
            return
        self._engine_steps = engine.global_steps
        norm = engine.get_global_grad_norm()
        if norm is None:
            return
        norm = float(norm)  # the same on every rank: reduced over all of them
        if math.isfinite(norm):
            self.log("train/grad_norm", norm, batch_size=1)
        elif not self._step_flagged:  # a non-finite loss has been dealt with before the step
            self._non_finite_step()

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else None
        if not self._finite_step(norm):
            return
        if norm is not None:
            self.log("train/grad_norm", norm, batch_size=1)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def _finite_step(self, grad_norm: torch.Tensor | None) -> bool:
        """False when this step's loss or gradients are NaN/Inf on any rank (every rank then agrees):
        `trainer.on_nan=raise` stops naming the step and the last good checkpoint; `skip` drops the
        step's gradients, so the optimizer leaves every weight (and its moments) as they were."""
        loss = self._loss
        bad = torch.tensor(float((loss is not None and not torch.isfinite(loss).all())
                                 or (grad_norm is not None and not torch.isfinite(grad_norm))), device=self.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad:
            return True
        self._step_flagged = True
        self._non_finite_step()
        for parameter in self.parameters():
            parameter.grad = None
        return False

    def _non_finite_step(self) -> None:
        """`trainer.on_nan=raise`: stop naming the step and the last good checkpoint; `skip`: count it."""
        if self.cfg.trainer.on_nan == "raise":
            callback = self.trainer.checkpoint_callback
            last = (callback.last_model_path or callback.best_model_path) if callback else ""
            raise FloatingPointError(
                f"non-finite loss or gradients at step {self.global_step} (epoch {self.current_epoch}); "
                f"last good checkpoint: {last or 'none yet'}. Lower trainer.lr, keep trainer.gradient_clip_val, "
                "or set trainer.on_nan=skip to drop such steps")
        self.log("train/skipped_steps", 1.0, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        encoder = self.model.item_tower.encoder
        encoder_params = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
        encoder_ids = {id(p) for p in encoder_params}
        other = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        lr = self.cfg.trainer.lr
        groups = [{"params": other, "lr": lr}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": lr * self.cfg.model.item.lr_scale})
        if self.cfg.trainer.offload_optimizer:
            # ZeRO-Offload steps on the CPU; DeepSpeed insists on its C++ Adam there (JIT-built).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=lr, weight_decay=self.cfg.trainer.weight_decay, adamw_mode=True)
        else:
            # A plain torch optimizer: DeepSpeed wraps a client optimizer (no C++ ops to build).
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=self.cfg.trainer.weight_decay)
        warmup = max(1, self.cfg.trainer.warmup_steps)
        if self.cfg.trainer.lr_plateau_patience:
            # The same warm-up as LinearLR, which scales the rate it finds rather than setting it
            # from the base rate every step as LambdaLR does, so the plateau's cuts stand
            # (trainers/plateau.py).
            schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
        else:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- evaluation -----------------------------------------------------------------------
    def catalogue_table(self) -> torch.Tensor:
        """[num_items, dim] vectors of the whole catalogue, as ranking reads them."""
        self.model.item_tower.build_frozen_cache(self.cfg.eval.item_batch_size)
        return self.model.catalogue_vectors(self.cfg.eval.item_batch_size)

    def target_ranks(self, history: Histories, target: torch.Tensor, table: torch.Tensor,
                     score_table: torch.Tensor | None = None, without: torch.Tensor | None = None) -> torch.Tensor:
        """0-based rank of each user's target over the catalogue `table` by <user, item> (the same
        order as model.scores, temperature > 0), the history filtered when eval.filter_seen.
        `score_table`: the same vectors as scored (float32 where `table` is bf16; default `table`);
        `without`: item indices left out of every user's ranking."""
        users = self.model.user_vectors(history.newest(self.cfg.data.max_len), table)
        ev = self.cfg.eval
        items = table if score_table is None else score_table
        exclude = history.items if ev.filter_seen else None
        if without is not None and len(without):
            left_out = without.expand(len(target), -1)
            exclude = left_out if exclude is None else torch.cat([exclude, left_out], 1)
        return target_ranks(users, items, target, exclude, ev.score_chunk_size)

    def _start_ranking(self, without: torch.Tensor | None = None) -> None:
        """`without`: item indices left out of the ranking."""
        self._without = without
        self._table = self.catalogue_table()  # in the model's dtype: the user tower reads it
        low = self._table.dtype in (torch.bfloat16, torch.float16)
        self._score_table = self._table.float() if low else self._table  # scored in float32, cast once
        self._sums: dict[str, torch.Tensor] = {}
        self._users = 0

    def _rank_batch(self, batch: tuple[Histories, torch.Tensor]) -> None:
        """Rows with target -1 pad a rank's share of users so that every rank runs the same number
        of forward passes (ZeRO-3 gathers parameters collectively); they are not scored."""
        history, target = batch
        ranks = self.target_ranks(history, target, self._table, self._score_table, self._without)[target >= 0]
        for name, values in metrics_per_user(ranks, self.cfg.eval.ks).items():
            self._sums[name] = self._sums.get(name, 0.0) + values.sum()
        self._users += len(ranks)

    def _log_ranking(self, prefix: str) -> None:
        """Sums and user counts are reduced over ranks, so the means weight every user equally."""
        names = sorted(self._sums) or [f"{m}@{k}" for k in self.cfg.eval.ks for m in ("hr", "ndcg", "mrr")]
        totals = torch.stack([torch.as_tensor(self._sums.get(n, 0.0), dtype=torch.float64, device=self.device) for n in names]
                             + [torch.tensor(float(self._users), dtype=torch.float64, device=self.device)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        count = max(totals[-1].item(), 1.0)
        # Every rank holds the same reduced values and logs them: ModelCheckpoint and EarlyStopping
        # run on every rank and must all see the monitored metric (the loggers write on rank 0 only).
        self.log_dict({f"{prefix}/{n}": totals[i].item() / count for i, n in enumerate(names)})
        del self._table, self._score_table

    def on_validation_epoch_start(self) -> None:
        self._start_ranking(None if self.cfg.eval.val_held_out else self.held_out)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._rank_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_ranking("val")

    def on_test_epoch_start(self) -> None:
        self._start_ranking()

    def test_step(self, batch, batch_idx: int) -> None:
        self._rank_batch(batch)

    def on_test_epoch_end(self) -> None:
        self._log_ranking(self.test_split)
