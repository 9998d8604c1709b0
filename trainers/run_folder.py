"""The run folder: resolved config, summary, curves. Every file is written to a temporary name
and renamed, so a crash never leaves one half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)


def without_prefix(metrics: dict[str, float]) -> dict[str, float]:
    """`{"test/hr@10": x}` -> `{"hr@10": x}`."""
    return {key.split("/", 1)[1]: value for key, value in metrics.items()}


def metrics_table(rows: dict[str, dict[str, float]], ks: list[int]) -> str:
    """A Markdown table: one row per system/split, HR/NDCG/MRR at each cut-off."""
    names = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]
    lines = ["| | " + " | ".join(n.upper() for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)
