"""Collectives the loss needs when several ranks train together (DDP or DeepSpeed).

Everything here is a no-op in a single process. Shapes may differ across ranks (each rank
deduplicates its own batch's items), and `all_gather` with mismatched shapes stalls forever, so
`gather_rows` exchanges the row counts first and pads to the largest.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """[*shape] on every rank -> [world, *shape], differentiable.

    Forward: slot r of the output holds rank r's tensor; our own slot is our tensor (open_clip's
    "put the local features back"), so its gradient stays on this rank. Backward: the other slots
    were built from other ranks' parameters, and their gradients belong there. Every rank
    backpropagates its own loss into all W slots, so rank r's slot receives d(L_s)/d(x_r) on every
    rank s; summing the slot gradients over ranks (all_reduce) and keeping our own slot gives
    d(sum_s L_s)/d(x_r), exactly what a single process computing every rank's loss would get.
    (open_clip's gradient-free gather keeps only d(L_r)/d(x_r) and drops the cross-rank terms; a
    reduce-scatter would do the same as this all_reduce with less traffic, but gloo lacks it.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, world = rank_and_world()
        slots = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(slots, tensor.contiguous())
        slots[ctx.rank] = tensor
        return torch.stack(slots)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


def gather_rows(x: torch.Tensor, fill: float | int = 0) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's rows of `x` [n_r, ...] in rank order -> ([sum n_r, ...], [n_0, n_1, ...]).

    Row counts are gathered first and every rank pads to the largest, so the collective always sees
    equal shapes; the padding is cut off again before anyone uses it. Gradients flow back to the
    rank that owns each row (see `_AllGatherWithGrad`)."""
    _, world = rank_and_world()
    if world == 1:
        return x, [x.shape[0]]
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = x
    if x.shape[0] < max(sizes):
        pad = x.new_full((max(sizes) - x.shape[0], *x.shape[1:]), fill)
        padded = torch.cat([x, pad])
    slots = _AllGatherWithGrad.apply(padded)
    return torch.cat([slots[r, :n] for r, n in enumerate(sizes)]), sizes


def gather_equal(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """[*shape], the same shape on every rank -> [world, *shape], slot r rank r's tensor; a single
    process gets [1, *shape]. `grad`: differentiable (`_AllGatherWithGrad`: each slot's gradient,
    summed over ranks, goes back to the rank that owns it). Without it the bytes are gathered, so
    any dtype works on any backend (gloo has no bfloat16 all_gather on older torch)."""
    _, world = rank_and_world()
    if world == 1:
        return x[None]
    if grad:
        return _AllGatherWithGrad.apply(x)
    raw = x.detach().reshape(-1).contiguous().view(torch.uint8)
    out = raw.new_empty(world, len(raw))
    dist.all_gather(list(out.unbind(0)), raw)  # straight into one buffer: no second copy of the table
    return out.view(x.dtype).reshape(world, *x.shape)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient)."""
    if rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
