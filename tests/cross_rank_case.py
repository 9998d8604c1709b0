"""The cross-rank softmax case that tests/trainers/test_distributed.py (CPU, gloo) and
tests/gpu/test_cross_rank.py (CUDA tensors, gloo and NCCL) share: two ranks with different
candidates, a worker that runs `cross_rank_softmax_loss` on them, and the reference, `softmax_loss`
in float64 in one process over the union of both ranks' candidates (each item once, logQ from global
counts); with `text_weight`, also each candidate's text-only copy (`model.loss.cold_weight`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from twotower.modules.losses import cross_rank_softmax_loss, softmax_loss

NUM_ITEMS, DIM, TEMPERATURE, NUM_UNIFORM, NUM_ELIGIBLE = 12, 5, 0.7, 3, 12


def rank_batch(rank: int) -> dict:
    """Rank-specific candidates (distinct, sorted, overlapping the other rank's), targets among
    them, query features; sizes differ across ranks on purpose (the gather pads)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.sort(torch.randperm(NUM_ITEMS, generator=g)[: 5 + 2 * rank]).values
    labels = torch.randint(len(ids), (3 + rank,), generator=g)
    features = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    return {"ids": ids, "labels": labels, "features": features, "occurrences": 4 + rank}


def parameters(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item table, query projection, sampler probabilities, text-only table)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(NUM_ITEMS, DIM, generator=g, dtype=torch.float64)
    proj = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    prob = torch.rand(NUM_ITEMS, generator=g, dtype=torch.float64)
    text = torch.randn(NUM_ITEMS, DIM, generator=g, dtype=torch.float64)
    return (table.to(device).requires_grad_(), proj.to(device).requires_grad_(), (prob / prob.sum()).to(device),
            text.to(device).requires_grad_())


def text_copies(text: torch.Tensor, ids: torch.Tensor, text_weight: float) -> dict:
    return {"text_candidates": text[ids], "text_weight": text_weight} if text_weight else {}


def worker(rank: int, world: int, port: int, out: str, backend: str = "gloo", device_of_rank: tuple[str, ...] = ("cpu", "cpu"),
           text_weight: float = 0.0) -> None:
    """One rank: its loss and gradients (averaged over ranks, as DDP and DeepSpeed do), saved to OUT/rank{rank}.pt."""
    device = torch.device(device_of_rank[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    table, proj, prob, text = parameters(device)
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rank_batch(rank).items()}
    loss = cross_rank_softmax_loss(b["features"] @ proj, table[b["ids"]], b["labels"], b["ids"], TEMPERATURE,
                                   prob, b["occurrences"], NUM_UNIFORM, NUM_ELIGIBLE, **text_copies(text, b["ids"], text_weight))
    assert loss.device == device, loss.device
    loss.backward()
    grads = [table.grad, proj.grad, text.grad if text_weight else torch.zeros((), dtype=torch.float64)]
    for grad in grads:  # what DDP / DeepSpeed do: average the gradients over ranks
        dist.all_reduce(grad)
        grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"device": str(loss.device), "loss": (mean_loss / world).cpu(), "table": grads[0].cpu(), "proj": grads[1].cpu(),
                "text": grads[2].cpu()},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(text_weight: float = 0.0) -> dict:
    """One process, float64 on the CPU: queries of both ranks, candidates = the union of their items."""
    table, proj, prob, text = parameters(torch.device("cpu"))
    batches = [rank_batch(r) for r in range(2)]
    union = torch.unique(torch.cat([b["ids"] for b in batches]))
    queries = torch.cat([b["features"] for b in batches]) @ proj
    targets = torch.cat([b["ids"][b["labels"]] for b in batches])
    occurrences = sum(b["occurrences"] for b in batches)
    log_q = torch.log(occurrences * prob[union] + 2 * NUM_UNIFORM / NUM_ELIGIBLE)
    loss = softmax_loss(queries, table[union], torch.searchsorted(union, targets), TEMPERATURE, log_q,
                        **text_copies(text, union, text_weight))
    loss.backward()
    return {"loss": loss.detach(), "table": table.grad, "proj": proj.grad,
            "text": text.grad if text_weight else torch.zeros((), dtype=torch.float64)}
