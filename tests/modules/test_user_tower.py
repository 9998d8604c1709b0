"""The user tower is causal and padding-blind; its time-gap and action features are embeddings
added to the inputs."""
import math

import numpy as np
import pytest
import torch

from twotower.configs.schema import UserTowerConfig
from twotower.modules.histories import TIME_GAP_CODES, time_gap_codes
from twotower.modules.user_tower import UserTower

POSITIONS = pytest.mark.parametrize("positions", ["from_end", "from_start"])
ARCHITECTURES = pytest.mark.parametrize("architecture", ["sasrec", "pre_ln"])


def make_tower(positions: str = "from_end", architecture: str = "sasrec"):
    torch.manual_seed(0)
    cfg = UserTowerConfig(architecture=architecture, layers=2, heads=2, dropout=0.0, max_len=8, positions=positions)
    return UserTower(cfg, dim=16).eval()


@ARCHITECTURES
@POSITIONS
def test_a_position_never_sees_later_items(positions, architecture):
    tower = make_tower(positions, architecture)
    x = torch.randn(1, 6, 16)
    valid = torch.ones(1, 6, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    before, after = tower(x, valid), tower(changed, valid)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@ARCHITECTURES
@POSITIONS
def test_left_padding_does_not_change_the_user_vector(positions, architecture):
    tower = make_tower(positions, architecture)
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


class PaperSASRec(torch.nn.Module):
    """SASRec as its authors' PyTorch port writes it (pmixer/SASRec.pytorch, which SASRec+ adapts):
    right padding, nn.MultiheadAttention with Q = LayerNorm(x) and K = V = x, Conv1d feed-forward,
    padding zeroed after each block. An independent reference for architecture=sasrec."""

    def __init__(self, dim: int, heads: int, layers: int, max_len: int):
        super().__init__()
        self.pos = torch.nn.Embedding(max_len, dim)
        self.ln_attn = torch.nn.ModuleList(torch.nn.LayerNorm(dim, eps=1e-8) for _ in range(layers))
        self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(dim, heads) for _ in range(layers))
        self.ln_fwd = torch.nn.ModuleList(torch.nn.LayerNorm(dim, eps=1e-8) for _ in range(layers))
        self.conv1 = torch.nn.ModuleList(torch.nn.Conv1d(dim, dim, 1) for _ in range(layers))
        self.conv2 = torch.nn.ModuleList(torch.nn.Conv1d(dim, dim, 1) for _ in range(layers))
        self.ln_last = torch.nn.LayerNorm(dim, eps=1e-8)

    def forward(self, emb: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        seqs = emb * emb.shape[-1] ** 0.5 + self.pos(torch.arange(emb.shape[1]))
        seqs = seqs * ~pad.unsqueeze(-1)
        causal = ~torch.tril(torch.ones(emb.shape[1], emb.shape[1], dtype=torch.bool))
        for i in range(len(self.attn)):
            s = seqs.transpose(0, 1)
            q = self.ln_attn[i](s)
            s = (q + self.attn[i](q, s, s, attn_mask=causal)[0]).transpose(0, 1)
            s = self.ln_fwd[i](s)
            s = s + self.conv2[i](torch.relu(self.conv1[i](s.transpose(-1, -2)))).transpose(-1, -2)
            seqs = s * ~pad.unsqueeze(-1)
        return self.ln_last(seqs)


def test_sasrec_architecture_matches_the_papers_code_in_float64():
    dim, heads, layers, max_len = 16, 2, 2, 8
    torch.manual_seed(0)
    ours = UserTower(UserTowerConfig(architecture="sasrec", layers=layers, heads=heads, dropout=0.0, max_len=max_len), dim).double().eval()
    ref = PaperSASRec(dim, heads, layers, max_len).double().eval()
    with torch.no_grad():
        ref.pos.weight.copy_(ours.positions.weight)
        ref.ln_last.load_state_dict(ours.ln_final.state_dict())
        for i, block in enumerate(ours.blocks):
            ref.ln_attn[i].load_state_dict(block.ln_attn.state_dict())
            ref.ln_fwd[i].load_state_dict(block.ln_mlp.state_dict())
            ref.attn[i].in_proj_weight.copy_(torch.cat([block.q.weight, block.kv.weight]))
            ref.attn[i].in_proj_bias.copy_(torch.cat([block.q.bias, block.kv.bias]))
            ref.attn[i].out_proj.load_state_dict(block.out.state_dict())
            ref.conv1[i].weight.copy_(block.mlp[0].weight[..., None]); ref.conv1[i].bias.copy_(block.mlp[0].bias)
            ref.conv2[i].weight.copy_(block.mlp[3].weight[..., None]); ref.conv2[i].bias.copy_(block.mlp[3].bias)
    lengths = [5, 2, 8]
    items = [torch.randn(n, dim, dtype=torch.float64) for n in lengths]
    right = torch.zeros(len(items), max_len, dim, dtype=torch.float64)
    left = torch.randn(len(items), max_len, dim, dtype=torch.float64)  # garbage in our padding slots
    for row, x in enumerate(items):
        right[row, :len(x)], left[row, max_len - len(x):] = x, x
    valid = torch.arange(max_len)[None] >= max_len - torch.tensor(lengths)[:, None]
    expected, got = ref(right, ~(torch.arange(max_len)[None] < torch.tensor(lengths)[:, None])), ours(left, valid)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, max_len - n:], expected[row, :n], rtol=1e-10, atol=1e-10)


def test_time_gap_codes_are_log2_buckets_of_the_seconds_since_the_previous_event():
    times = np.array([100.0, 100.0, 101.0, 103.0, 106.0, 107.0, 3707.0, 1e9])
    codes = time_gap_codes(times)
    # Reference, one gap at a time: code 1 + min(floor(log2(gap + 1)), 26); nothing before the first.
    expected = [0] + [1 + min(int(math.floor(math.log2(gap + 1))), 26) for gap in np.diff(times)]
    assert codes.tolist() == expected == [0, 1, 2, 2, 3, 2, 12, 27]
    assert codes.max() < TIME_GAP_CODES


def featured_tower(num_actions: int = 3) -> UserTower:
    torch.manual_seed(0)
    cfg = UserTowerConfig(layers=2, heads=2, dropout=0.0, max_len=8, time_gaps=True, actions=True)
    return UserTower(cfg, dim=16, num_actions=num_actions).eval()


def test_features_add_their_embeddings_to_the_inputs_and_stay_causal():
    tower, plain = featured_tower(), make_tower("from_start")
    x, valid = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    gaps, actions = torch.tensor([[0, 3, 1, 27, 5, 2]]), torch.tensor([[1, 2, 3, 1, 0, 2]])
    # The same weights otherwise (the feature tables are built last, after the same draws).
    assert plain.load_state_dict(tower.state_dict(), strict=False).unexpected_keys == ["time_gaps.weight", "actions.weight"]
    # Embedding code c of each feature is the same as adding its row to the item vector, scaled back.
    shifted = x + (tower.time_gaps.weight[gaps] + tower.actions.weight[actions]) / tower.input_scale
    torch.testing.assert_close(tower(x, valid, gaps, actions), plain(shifted, valid), rtol=1e-5, atol=1e-5)
    # A later item's codes never reach an earlier position.
    later = actions.clone()
    later[0, 4:] = 3
    before, after = tower(x, valid, gaps, actions), tower(x, valid, gaps, later)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_an_action_feature_without_action_codes_is_refused():
    with pytest.raises(ValueError, match="model.user.actions=true, but the data has no action codes"):
        featured_tower(num_actions=0)


@ARCHITECTURES
def test_set_dropout_zero_makes_training_mode_compute_what_eval_mode_does(architecture):
    """`twotower learn` runs with learn.dropout=0: in training mode the tower must then be
    deterministic and equal to its eval-mode output; at a positive rate it draws masks again."""
    torch.manual_seed(0)
    cfg = UserTowerConfig(architecture=architecture, layers=2, heads=2, dropout=0.3, max_len=8)
    tower = UserTower(cfg, dim=16)
    x, valid = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    expected = tower.eval()(x, valid)
    tower.train()
    assert not torch.allclose(tower(x, valid), expected)  # dropout 0.3 draws masks
    tower.set_dropout(0.0)
    torch.testing.assert_close(tower(x, valid), expected)
    tower.set_dropout(0.3)
    assert not torch.allclose(tower(x, valid), expected)
