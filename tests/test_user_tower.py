"""The user tower is causal and padding-blind."""
import pytest
import torch

from configs.schema import UserTowerConfig
from modules.user_tower import UserTower

POSITIONS = pytest.mark.parametrize("positions", ["from_end", "from_start"])


def make_tower(positions: str = "from_end"):
    torch.manual_seed(0)
    return UserTower(UserTowerConfig(layers=2, heads=2, dropout=0.0, max_len=8, positions=positions), dim=16).eval()


@POSITIONS
def test_a_position_never_sees_later_items(positions):
    tower = make_tower(positions)
    x = torch.randn(1, 6, 16)
    valid = torch.ones(1, 6, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    before, after = tower(x, valid), tower(changed, valid)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@POSITIONS
def test_left_padding_does_not_change_the_user_vector(positions):
    tower = make_tower(positions)
    x = torch.randn(1, 3, 16)
    padded = torch.cat([torch.randn(1, 5, 16), x], dim=1)  # garbage in the padding slots
    valid = torch.tensor([[False] * 5 + [True] * 3])
    short = tower(x, torch.ones(1, 3, dtype=torch.bool))
    # Positions count from the newest item, or from the oldest real one: either way padding shifts nothing.
    torch.testing.assert_close(tower(padded, valid)[:, -1], short[:, -1])
    assert torch.isfinite(tower(padded, valid)).all()


def test_from_start_positions_count_from_the_oldest_item_shown():
    """from_start: the same two items at the start of a history of 2 and of 3 see the same
    positions (0, 1); from_end gives them different ones (the newest is always the last)."""
    x = torch.randn(1, 3, 16)
    for positions, same in (("from_start", True), ("from_end", False)):
        tower = make_tower(positions)
        prefix, longer = tower(x[:, :2], torch.ones(1, 2, dtype=torch.bool)), tower(x, torch.ones(1, 3, dtype=torch.bool))
        assert torch.allclose(prefix, longer[:, :2], atol=1e-6) is same
