"""`eval.val_held_out`: validation while training ranks the held-out items (the default), or leaves
them out so early stopping follows the warm model alone. Reference: each target's rank counted by
brute force in float64 over the items each user may be shown."""
import numpy as np
import pytest
import torch

from twotower.configs import load_config
from twotower.modules.histories import Histories
from twotower.modules.lit_two_tower import TwoTowerModule

COLD = torch.tensor([False, True, False, False, True, False, False, True])
HISTORY = torch.tensor([[-1, 0, 2, 3], [0, 3, 5, 2], [-1, -1, 6, 5]])
TARGETS = torch.tensor([5, 6, 0])


def brute_force_ranks(users: np.ndarray, items: np.ndarray, leave_out_held_out: bool) -> list[int]:
    ranks = []
    for user, history, target in zip(users, HISTORY.tolist(), TARGETS.tolist()):
        scores = items @ user
        shown = [i for i in range(len(items))
                 if i != target and i not in history and not (leave_out_held_out and COLD[i])]
        ranks.append(sum(scores[i] >= scores[target] for i in shown))
    return ranks


@pytest.mark.parametrize("val_held_out", [True, False])
def test_validation_ranks_the_held_out_items_unless_told_not_to(val_held_out):
    cfg = load_config([], ["model.mode=id", "model.dim=8", "data.max_len=4", f"eval.val_held_out={val_held_out}",
                           "eval.ks=[1,2,3]"])
    torch.manual_seed(0)
    module = TwoTowerModule(cfg, len(COLD), torch.ones(len(COLD)), COLD).eval()
    with torch.no_grad():
        module.model.item_tower.id_embedding.weight.normal_()  # held-out rows too: they compete
        module.on_validation_epoch_start()
        module.validation_step((Histories.of(HISTORY), TARGETS), 0)
        table = module.model.item_tower(torch.arange(len(COLD)))
        users = module.model.user_vectors(HISTORY, table)
    ranks = brute_force_ranks(users.double().numpy(), table.double().numpy(), not val_held_out)
    assert ranks != brute_force_ranks(users.double().numpy(), table.double().numpy(), val_held_out)  # the case tells them apart
    for k in (1, 2, 3):
        assert module._sums[f"hr@{k}"].item() == sum(r < k for r in ranks)
        np.testing.assert_allclose(module._sums[f"ndcg@{k}"].item(), sum(1 / np.log2(r + 2) for r in ranks if r < k))
