"""The Lightning strategy a `TrainerConfig` asks for: one process, DDP, or DeepSpeed ZeRO 1/2/3
(with optional CPU offload), on GPUs with NCCL or on CPUs with gloo.

DeepSpeed on CPU: Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA, yet DeepSpeed
itself (>= 0.14, `DS_ACCELERATOR=cpu`) runs ZeRO over gloo. `CPUDeepSpeedStrategy` removes only
Lightning's refusal, so CPU tests exercise the very code that runs on GPUs: the same
`deepspeed.initialize`, the same ZeRO partitioning, collectives and checkpoint layout.
"""
from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

from twotower.configs.schema import TrainerConfig


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` whose processes may live on CPU devices. Exactly two checks differ:

    * `setup_environment`: the parent raises unless the accelerator is `CUDAAccelerator`; here we
      go straight to what the parent would do next, `DDPStrategy.setup_environment` (which calls our
      `setup_distributed`, then lets the accelerator set up its device).
    * `setup_distributed`: the parent validates that device *indices* equal the local ranks
      (`cuda:0, cuda:1, ...`); CPU devices have no index (`cpu`, `cpu`), so that check is skipped.
      The rest is the parent's: world ranks, env vars, `deepspeed.init_distributed` with the
      backend of `DDPStrategy._get_process_group_backend` (gloo for CPU devices).

    * `root_device` is `cpu:<local_rank>` instead of `cpu`: Lightning passes
      `root_device.index` to `deepspeed.initialize` as `device_rank`, and DeepSpeed compares it with
      0 (None fails). A CPU index means nothing to torch (`cpu:1` tensors live in the same memory).

    `DS_ACCELERATOR=cpu` (set by `build_strategy` before DeepSpeed is imported) makes DeepSpeed use
    its CPU accelerator rather than probe for CUDA. On first use DeepSpeed JIT-builds a small C++
    shared-memory op (`deepspeed_shm_comm_op`, ~2 min, cached in ~/.cache/torch_extensions).
    """

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning_fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def _on_cpu(t: TrainerConfig) -> bool:
    return t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's keyword that stops it broadcasting every buffer from rank 0 before every forward.

    By default DDP does that broadcast, for buffers that forward updates (BatchNorm's running
    statistics). Ours are data, not state: `item_prob` and `eligible` (TwoTowerModule), and the
    encoder's constant `position_ids` (the catalogue's token ids are no buffers at all: the ranks of
    a machine share them memory-mapped, and a broadcast into them would copy them per rank). No
    module updates a buffer in forward (no BatchNorm anywhere), and every rank builds these from
    the same shards before training, so they are identical on all ranks by construction and the
    broadcast would only copy them over themselves, every step.

    torch 2.13 deprecates `broadcast_buffers` for `forward_sync_buffers` (which still syncs buffers
    once when DDP wraps the model, harmless here); older torch only has `broadcast_buffers`."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def build_strategy(t: TrainerConfig) -> Strategy | str:
    """`trainer.strategy` -> what `pl.Trainer(strategy=...)` takes."""
    if t.strategy == "auto":
        return "auto"
    if t.strategy == "ddp":
        # Every parameter is used in every step (the pooler is dropped in ItemTower), so DDP need
        # not search the graph for unused ones.
        return DDPStrategy(process_group_backend=t.process_group_backend, find_unused_parameters=False,
                           timeout=timedelta(seconds=t.collective_timeout_s), **_no_forward_buffer_sync())
    on_cpu = _on_cpu(t)
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cls = CPUDeepSpeedStrategy if on_cpu else DeepSpeedStrategy
    return cls(
        stage=t.zero_stage,
        offload_optimizer=t.offload_optimizer,
        offload_parameters=t.offload_parameters,
        process_group_backend=t.process_group_backend,
        timeout=timedelta(seconds=t.collective_timeout_s),
        # Only for DeepSpeed's throughput print-outs: our training set is an IterableDataset, whose
        # batch size Lightning cannot read off a sampler.
        logging_batch_size_per_gpu=1,
        # The model is built whole on every rank (ItemTower calls `from_pretrained` in __init__,
        # never inside `configure_model`: Lightning #19259) and ZeRO-3 partitions it in
        # `deepspeed.initialize`; checkpoints stay sharded, one file per rank.
        pin_memory=not on_cpu,
    )
