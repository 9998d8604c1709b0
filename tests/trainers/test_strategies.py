"""What `build_strategy` hands to torch's DistributedDataParallel, checked with real processes.

The two-tower module registers data as buffers: the catalogue's token ids and lengths
(`item_tower.tokens` / `lengths`, [num_items, max_text_len]), `item_prob` and `eligible`. DDP
with its default `broadcast_buffers=True` copies every buffer from rank 0 to the other ranks
before every forward (about 256 MB per step at 1M items x 32 tokens). None of them changes during
training (no BatchNorm: nothing updates a buffer in forward) and every rank builds them the same
from the same shards, so the strategy turns that broadcast off. The test wraps a module with a
buffer in DDP with exactly the keyword arguments the strategy passes (Lightning's
`DDPStrategy._ddp_kwargs`), gives each rank its own buffer value, runs a step, and checks that
rank 1 kept its value (a broadcast would have overwritten it with rank 0's); a control wrap with
DDP's defaults shows that the check sees a broadcast when there is one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twotower.configs.schema import TrainerConfig
from twotower.trainers.strategies import build_strategy

from helpers import free_port

# DDP's switches for the per-forward buffer broadcast: `broadcast_buffers` (deprecated in torch
# 2.13) and `forward_sync_buffers` (its replacement there).
BUFFER_SYNC_KEYS = ("broadcast_buffers", "forward_sync_buffers")


class WithBuffers(nn.Module):
    """A linear layer plus two buffers that forward reads, shaped like the module's: token ids and
    a probability vector."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.linear = nn.Linear(4, 1)
        self.register_buffer("tokens", torch.zeros(3, 5, dtype=torch.long), persistent=False)
        self.register_buffer("prob", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(1) + self.prob[self.tokens[:, 0] % 3]


def ddp_kwargs_of(strategy) -> dict:
    """The keyword arguments Lightning's DDPStrategy passes to DistributedDataParallel
    (`_setup_model`: `DistributedDataParallel(module=model, device_ids=..., **self._ddp_kwargs)`)."""
    return dict(strategy._ddp_kwargs)


def _step(rank: int, kwargs: dict) -> dict:
    """Wrap a fresh module in DDP with `kwargs`, set its buffers to rank-specific values (in place,
    so DDP's own references see them), run forward and backward; what the buffers and the
    gradient hold afterwards."""
    ddp = DistributedDataParallel(WithBuffers(), **kwargs)
    ddp.module.tokens.fill_(10 + rank)
    ddp.module.prob.fill_(0.5 + rank)
    x = torch.full((3, 4), 1.0 + rank)
    ddp(x).sum().backward()
    return {"tokens": ddp.module.tokens.clone(), "prob": ddp.module.prob.clone(),
            "grad": ddp.module.linear.weight.grad.clone()}


def _worker(rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    defaults = {k: v for k, v in kwargs.items() if k not in BUFFER_SYNC_KEYS}  # DDP's default: broadcast
    torch.save({"strategy": _step(rank, kwargs), "default": _step(rank, defaults)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_strategy_keeps_each_ranks_buffers_and_skips_the_unused_parameter_search(tmp_path):
    strategy = build_strategy(TrainerConfig(strategy="ddp", accelerator="cpu", devices=2))
    kwargs = ddp_kwargs_of(strategy)
    assert kwargs.get("find_unused_parameters") is False, kwargs

    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), kwargs), nprocs=2, start_method="spawn", join=True)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    # Control: with DDP's defaults, rank 1's buffers hold rank 0's values after the forward.
    assert torch.equal(got[1]["default"]["tokens"], torch.full((3, 5), 10)), "DDP's default did not broadcast"
    assert torch.equal(got[1]["default"]["prob"], torch.full((3,), 0.5))
    # The strategy's DDP: every rank keeps its own buffers.
    for rank in range(2):
        assert torch.equal(got[rank]["strategy"]["tokens"], torch.full((3, 5), 10 + rank)), f"rank {rank} tokens"
        assert torch.equal(got[rank]["strategy"]["prob"], torch.full((3,), 0.5 + rank)), f"rank {rank} prob"
    # ... and DDP still averages the gradients: both ranks hold the mean of grad = x (1 and 2 per entry).
    for rank in range(2):
        torch.testing.assert_close(got[rank]["strategy"]["grad"], torch.full((1, 4), 3 * 1.5))
