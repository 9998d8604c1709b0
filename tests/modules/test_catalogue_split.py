"""Catalogue encoding split across ranks (`TwoTower.catalogue_table`): 2 gloo ranks, each encoding
half of the items and gathering the rest, give one process's vectors (and pooled text), the same validation ranks
and metrics, and (with grad, the full-catalogue softmax) the gradients, summed over ranks, that
every rank encoding the whole catalogue itself gives. The reference is one process without
torch.distributed. 23 items (odd: one rank's share is padded), length buckets of 4, chunks of 5."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twotower.configs import load_config
from twotower.modules.histories import Histories
from twotower.modules.item_text import load_tokenizer, tokenize
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.modules.metrics import metrics_per_user

from helpers import free_port

NUM_ITEMS, WORLD = 23, 2
WORDS = "sailing boats jazz piano mountain bikes garden tools tea pots old maps".split()


def module(tiny_bert: str, extra: tuple[str, ...] = ()) -> TwoTowerModule:
    """The same weights and catalogue in every process (texts of 1 to 12 words), in eval mode (no dropout)."""
    cfg = load_config([], [f"model.item.encoder={tiny_bert}", "model.item.train_layers=-1", "model.dim=16",
                           "model.item.bucket_items=4", "model.item.cache_frozen=false", *extra])
    torch.manual_seed(0)
    m = TwoTowerModule(cfg, NUM_ITEMS, torch.arange(NUM_ITEMS), torch.zeros(NUM_ITEMS, dtype=torch.bool))
    # Distinct texts (a number first): two items with one text would tie exactly in one process and
    # break the tie by float noise in another, where the shares pad their chunks differently.
    texts = [" ".join([str(i), *(WORDS[(i + j) % len(WORDS)] for j in range((i * 7) % 12))]) for i in range(NUM_ITEMS)]
    ids = tokenize(load_tokenizer(tiny_bert), texts, 16)
    tokens = np.zeros((NUM_ITEMS, 16), dtype=np.int32)
    for i, t in enumerate(ids):
        tokens[i, :len(t)] = t
    m.model.item_tower.set_catalogue(torch.from_numpy(tokens), torch.tensor([len(t) for t in ids]))
    return m.eval()


def users() -> tuple[Histories, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return Histories.of(torch.randint(0, NUM_ITEMS, (9, 5), generator=g)), torch.randint(0, NUM_ITEMS, (9,), generator=g)


def rank_loss(table: torch.Tensor, rank: int) -> torch.Tensor:
    """A loss that differs per rank and reads every row (as a rank's full softmax does)."""
    weights = torch.randn(table.shape, generator=torch.Generator().manual_seed(10 + rank), dtype=table.dtype)
    return (table * weights).sum() + table[rank].square().sum()


def results(m: TwoTowerModule, rank: int, world: int) -> dict:
    """Vectors (no grad, chunks of 5), validation ranks and metrics over them, and gradients of the
    full-catalogue table (one call), summed over ranks as DDP would before averaging."""
    vectors = m.model.catalogue_vectors(5)
    pooled = m.model.catalogue_pooled(5)  # the stale table of `model.loss.refresh_every`
    history, target = users()
    with torch.no_grad():
        ranks = m.target_ranks(history, target, m.catalogue_table())
    table = m.model.catalogue_table()  # grad enabled
    # One process stands for every rank: the sum of their losses over its own whole table.
    (rank_loss(table, rank) if world > 1 else sum(rank_loss(table, r) for r in range(WORLD))).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for grad in grads.values():
        if world > 1:
            dist.all_reduce(grad)
    return {"vectors": vectors, "pooled": pooled, "ranks": ranks, "metrics": {k: float(v.sum()) for k, v in metrics_per_user(ranks, [5, 10]).items()},
            "grads": grads, "table": table.detach()}


def _worker(rank: int, port: int, out: str, tiny_bert: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    m = module(tiny_bert)
    mine, shares = m.model.catalogue_share(torch.device("cpu"))
    torch.save({**results(m, rank, WORLD), "mine": mine, "shares": shares}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tiny_bert, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("split")
    mp.start_processes(_worker, args=(free_port(), str(out), tiny_bert), nprocs=WORLD, start_method="spawn", join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_each_rank_encodes_its_own_half_padded_to_equal_length(two_ranks):
    shares = two_ranks[0]["shares"]
    assert sorted(torch.cat(shares).tolist()) == list(range(NUM_ITEMS))  # a partition of the catalogue
    assert [len(s) for s in shares] == [12, 11]
    assert [len(r["mine"]) for r in two_ranks] == [12, 12]  # rank 1 repeats its last item
    assert two_ranks[1]["mine"][:11].tolist() == shares[1].tolist() and two_ranks[1]["mine"][11] == shares[1][-1]


def test_two_ranks_give_the_vectors_ranks_and_metrics_of_one_process(two_ranks, tiny_bert):
    expected = results(module(tiny_bert), 0, 1)
    for rank, got in enumerate(two_ranks):
        torch.testing.assert_close(got["vectors"], expected["vectors"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        torch.testing.assert_close(got["pooled"], expected["pooled"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        torch.testing.assert_close(got["table"], expected["table"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        assert torch.equal(got["ranks"], expected["ranks"]), rank
        assert got["metrics"] == pytest.approx(expected["metrics"], abs=1e-12), rank


def test_the_split_table_gives_the_gradients_of_encoding_the_whole_catalogue_on_every_rank(two_ranks, tiny_bert):
    expected = results(module(tiny_bert), 0, 1)["grads"]
    assert "model.item_tower.encoder.encoder.layer.0.attention.self.query.weight" in expected
    for rank, got in enumerate(two_ranks):
        assert set(got["grads"]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")


def test_one_process_and_cheap_items_encode_everything_locally(tiny_bert):
    """No process group, or an ID model (a lookup costs less than the exchange): every item, here."""
    m = module(tiny_bert)
    mine, shares = m.model.catalogue_share(torch.device("cpu"))
    assert len(shares) == 1 and sorted(mine.tolist()) == list(range(NUM_ITEMS))
    m = module(tiny_bert, ("model.mode=id",))
    assert torch.equal(m.model.catalogue_vectors(5), m.model.item_tower.id_embedding.weight.detach())
