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
import torch.multiprocessing as mp

from cross_rank_case import reference, worker
from helpers import free_port

from .conftest import GPU_TIER, HARDWARE, ON_CPU

pytestmark = GPU_TIER

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
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path), backend, devices), nprocs=2, start_method="spawn",
                       join=True)
    expected = reference()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["device"] == str(torch.device(devices[rank])), got["device"]
        for key in ("loss", "table", "proj"):
            # float64 on both sides; CUDA reduces in another order than the CPU: a few ulps apart.
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=f"rank {rank} {key}")
