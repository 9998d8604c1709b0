"""The user tower is causal and padding-blind."""
import torch

from configs.schema import UserTowerConfig
from modules.user_tower import UserTower


def make_tower():
    torch.manual_seed(0)
    return UserTower(UserTowerConfig(layers=2, heads=2, dropout=0.0, max_len=8), dim=16).eval()


def test_a_position_never_sees_later_items():
    tower = make_tower()
    x = torch.randn(1, 6, 16)
    valid = torch.ones(1, 6, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    before, after = tower(x, valid), tower(changed, valid)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_left_padding_does_not_change_the_user_vector():
    tower = make_tower()
    x = torch.randn(1, 3, 16)
    padded = torch.cat([torch.randn(1, 5, 16), x], dim=1)  # garbage in the padding slots
    valid = torch.tensor([[False] * 5 + [True] * 3])
    short = tower(x, torch.ones(1, 3, dtype=torch.bool))
    # Positions are counted from the newest item, so the short and the padded history align.
    torch.testing.assert_close(tower(padded, valid)[:, -1], short[:, -1])
    assert torch.isfinite(tower(padded, valid)).all()
