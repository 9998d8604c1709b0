"""The run folder's plots. Each is written to a temporary name and renamed (`twotower.files`), so a
crash never leaves one half-written."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from twotower.files import atomic_file  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Lay out `fig`, write it to `path` (PNG) atomically, and free it."""
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Training loss by step and validation metrics by epoch, side by side."""
    frame = pd.read_csv(metrics_csv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if "train/loss" in frame:
        loss = frame.dropna(subset=["train/loss"])
        left.plot(loss["step"], loss["train/loss"])
    left.set(xlabel="step", ylabel="train/loss", title="training loss")
    for name in ("val/ndcg@10", "val/hr@10", "val/mrr@10"):
        if name in frame:
            val = frame.dropna(subset=[name])
            right.plot(val["epoch"] + 1, val[name], marker="o", label=name)
    right.set(xlabel="epoch", title="validation")
    right.legend()
    save_figure(fig, out_png)
