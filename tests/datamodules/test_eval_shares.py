"""Each rank reads only its share of the evaluation users: the shares of W ranks partition the split,
every rank runs the same number of batches, and a rank keeps no copy of the others' cases."""
import math

import pytest
import torch

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare
from twotower.trainers.evaluate import popularity_ranks


@pytest.fixture(scope="module")
def prepared(tiny_bert, tmp_path_factory):
    from conftest import tiny

    cfg = load_config([], tiny(tiny_bert, tmp_path_factory.mktemp("shares")) + ["data.shard_max_count=40"])
    prepare(cfg)
    return cfg


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_partition_the_split_and_pad_to_the_same_length(prepared, world):
    everyone = [c["json"]["user_id"] for c in ShardDataModule(prepared).cases("test")]
    shares = []
    for rank in range(world):
        data = ShardDataModule(prepared)  # one process per rank: nothing read before
        mine, total = data.share("test", rank, world)
        assert total == len(everyone) and len(mine) in (len(everyone) // world, math.ceil(len(everyone) / world))
        held = sum(len(cases) for cases, _ in data._cases.values())
        assert held == len(mine), "a rank keeps its own share only"
        batches = list(data.eval_dataloader("test", 0, rank, world))
        assert sum(len(t) for _, t in batches) == math.ceil(len(everyone) / world)  # padded: every rank alike
        shares.append([c["json"]["user_id"] for c in mine])
    assert sorted(u for share in shares for u in share) == sorted(everyone)
    assert [u for rank in range(world) for u in everyone[rank::world]] == [u for share in shares for u in share]


def test_a_limited_share_counts_the_first_cases_only(prepared):
    data = ShardDataModule(prepared)
    first = [c["json"]["user_id"] for c in data.cases("valid")[:25]]
    mine, total = data.share("valid", 1, 2, limit=25)
    assert total == 25 and [c["json"]["user_id"] for c in mine] == first[1::2]


def test_popularity_ranks_of_the_shares_are_those_of_the_whole_split(prepared):
    data = ShardDataModule(prepared)
    whole = popularity_ranks(data, "test")
    parts = torch.cat([popularity_ranks(data, "test", rank, 3) for rank in range(3)])
    assert len(parts) == len(whole) and torch.equal(parts.sort().values, whole.sort().values)
