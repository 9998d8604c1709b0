"""Leave-one-out by time (docs/data.md) on hand-made sequences whose answer is written out."""
import numpy as np
import pandas as pd

from twotower.configs.schema import SplitConfig
from twotower.datamodules.split import leave_one_out


def frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


ITEMS = pd.Series(np.arange(6), index=["a", "b", "c", "d", "e", "f"])


def test_last_is_test_second_last_is_valid_and_ties_keep_file_order():
    rows = [("u1", "c", 3), ("u1", "a", 1), ("u1", "b", 2), ("u1", "d", 2),  # b and d tie: file order
            ("u2", "a", 5), ("u2", "b", 6),  # only two events: dropped
            ("u3", "f", 1), ("u3", "e", 1), ("u3", "a", 1)]
    split = leave_one_out(frame(rows), ITEMS, SplitConfig())
    # u1 in time order: a(1) b(2) d(2) c(3)
    assert [(s.user_id, s.events.items.tolist()) for s in split.train] == [("u1", [0, 1]), ("u3", [5])]
    assert [(c.user_id, c.history.tolist(), c.target) for c in split.valid] == [("u1", [0, 1], 3), ("u3", [5], 4)]
    assert [(c.user_id, c.history.tolist(), c.target) for c in split.test] == [("u1", [0, 1, 3], 2), ("u3", [5, 4], 0)]
    assert split.dropped_users == 1 and not split.cold
    assert split.train_counts.tolist() == [1, 1, 0, 0, 0, 1]


def test_cold_items_leave_training_and_form_the_cold_split():
    rows = [("u1", i, t) for t, i in enumerate("abcdef")] + [("u2", i, t) for t, i in enumerate("fabcd")]
    interacted = 6
    split = leave_one_out(frame(rows), ITEMS, SplitConfig(cold_item_fraction=1 / interacted, seed=3))
    cold = int(np.flatnonzero(split.cold_items)[0])
    assert split.cold_items.sum() == 1
    for seq in split.train:
        assert cold not in seq.events.items.tolist()
    for case in split.valid + split.test:
        assert cold not in case.history.tolist() and case.target != cold
    for case in split.cold:
        assert case.target == cold and len(case.history) > 0 and cold not in case.history.tolist()
    assert split.train_counts[cold] == 0
