"""The cross-rank softmax on CUDA tensors: two processes gather each other's candidates (sizes
first, then the padded rows, with gradients) from device memory and give the loss and gradients of
one process over the concatenated batch, as tests/trainers/test_distributed.py checks on the CPU.

Two processes on ONE GPU cannot come from Lightning: `trainer.devices` is an int (a list such as
`[0,0]` is a config error), and Lightning itself refuses repeated GPU ids ("Device ID's (GPU) must
be unique."); NCCL refuses two ranks on one device too. So this starts the processes itself
(torch.multiprocessing) with gloo, which runs its collectives on CUDA tensors; with two or more
GPUs it also runs over NCCL, one GPU per rank. Reference: `softmax_loss` in float64 on the CPU
over the union of both ranks' candidates (each item once, logQ from global counts)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twotower.modules.losses import cross_rank_softmax_loss, softmax_loss

from helpers import free_port

from .conftest import GPU_TIER, HARDWARE, ON_CPU

pytestmark = GPU_TIER

NUM_ITEMS, DIM, TEMPERATURE, NUM_UNIFORM, NUM_ELIGIBLE = 12, 5, 0.7, 3, 12


def rank_batch(rank: int) -> dict:
    """Rank-specific candidates (distinct, sorted, overlapping the other rank's), targets among
    them, query features; sizes differ across ranks on purpose (the gather pads)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.sort(torch.randperm(NUM_ITEMS, generator=g)[: 5 + 2 * rank]).values
    labels = torch.randint(len(ids), (3 + rank,), generator=g)
    features = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    return {"ids": ids, "labels": labels, "features": features, "occurrences": 4 + rank}


def parameters(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(NUM_ITEMS, DIM, generator=g, dtype=torch.float64)
    proj = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    prob = torch.rand(NUM_ITEMS, generator=g, dtype=torch.float64)
    return table.to(device).requires_grad_(), proj.to(device).requires_grad_(), (prob / prob.sum()).to(device)


def _worker(rank: int, world: int, port: int, out: str, backend: str, device_of_rank: list[str]) -> None:
    device = torch.device(device_of_rank[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    table, proj, prob = parameters(device)
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rank_batch(rank).items()}
    loss = cross_rank_softmax_loss(b["features"] @ proj, table[b["ids"]], b["labels"], b["ids"], TEMPERATURE,
                                   prob, b["occurrences"], NUM_UNIFORM, NUM_ELIGIBLE)
    assert loss.device == device, loss.device
    loss.backward()
    grads = [table.grad, proj.grad]
    for grad in grads:  # what DDP / DeepSpeed do: average the gradients over ranks
        dist.all_reduce(grad)
        grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"device": str(loss.device), "loss": (mean_loss / world).cpu(), "table": grads[0].cpu(), "proj": grads[1].cpu()},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def reference() -> dict:
    """One process, float64 on the CPU: queries of both ranks, candidates = the union of their items."""
    table, proj, prob = parameters(torch.device("cpu"))
    batches = [rank_batch(r) for r in range(2)]
    union = torch.unique(torch.cat([b["ids"] for b in batches]))
    queries = torch.cat([b["features"] for b in batches]) @ proj
    targets = torch.cat([b["ids"][b["labels"]] for b in batches])
    occurrences = sum(b["occurrences"] for b in batches)
    log_q = torch.log(occurrences * prob[union] + 2 * NUM_UNIFORM / NUM_ELIGIBLE)
    loss = softmax_loss(queries, table[union], torch.searchsorted(union, targets), TEMPERATURE, log_q)
    loss.backward()
    return {"loss": loss.detach(), "table": table.grad, "proj": proj.grad}


SHARED_GPU = "cpu" if ON_CPU else "cuda:0"
CASES = {
    "gloo, two ranks on one GPU": ("gloo", [SHARED_GPU, SHARED_GPU]),
    "nccl, one GPU per rank": ("nccl", ["cuda:0", "cuda:1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_on_cuda_tensors_equal_one_process_on_the_concatenated_batch(case, tmp_path):
    backend, devices = CASES[case]
    if backend == "nccl" and (ON_CPU or HARDWARE.gpus < 2):
        pytest.skip("NCCL needs one GPU per rank: fewer than 2 GPUs here")
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), backend, devices), nprocs=2, start_method="spawn",
                       join=True)
    expected = reference()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["device"] == str(torch.device(devices[rank])), got["device"]
        for key in ("loss", "table", "proj"):
            # float64 on both sides; CUDA reduces in another order than the CPU: a few ulps apart.
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=f"rank {rank} {key}")
