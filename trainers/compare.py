"""`twotower compare RUN_DIR... | SWEEP_DIR`: runs side by side.

Writes, into `--out` (default: the sweep folder, or `comparison/`):
- `comparison.md` and `comparison.csv`: one row per finished run (one with `summary.json`), the
  config keys whose values differ between the runs, and the final metrics, best run first by the
  sweep's metric (from `sweep.json`, else `--metric`, default val/ndcg@10 maximised). A `val/`
  metric is the best epoch's, the value the run's checkpoint was chosen by (`summary.json`'s
  `best/val/...`, else the best row of `metrics.csv`).
- `val_curves.png`: each run's validation metric by epoch and training loss by step, overlaid.
- `metric_vs_params.png`: the metric against each swept parameter (the sweep's parameters, else
  the differing config keys), one panel each.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.ticker import MaxNLocator

from twotower.files import write_text
from twotower.tables import markdown_table
from twotower.trainers.run_folder import plt, save_figure

TABLE_METRICS = ("test/hr@10", "test/ndcg@10", "test/mrr@10", "epochs", "wall_s")
"Summary values shown in the Markdown table besides the sweep metric (the CSV has them all)."
IGNORED_KEYS = ("run.",)
"Config keys that differ between any two runs by construction."
ABSENT = "(absent)"
"The value shown for a key a run's config does not have (a run made by an older version)."


@dataclass
class Run:
    name: str
    dir: Path
    config: dict
    "Flattened resolved config (dotted keys)."
    summary: dict
    curves: pd.DataFrame
    "metrics.csv (empty when missing)."


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run(folder: Path) -> Run:
    config = flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    summary = json.loads((folder / "summary.json").read_text())
    metrics = folder / "metrics.csv"
    curves = pd.read_csv(metrics) if metrics.is_file() else pd.DataFrame()
    return Run(name=str(config.get("run.name") or folder.name), dir=folder, config=config, summary=summary, curves=curves)


def find_runs(paths: list[str | Path]) -> tuple[list[Path], list[Path], dict]:
    """Run folders (with config.yaml) among `paths` and their sub-folders -> (finished,
    unfinished, the sweep.json of a single sweep folder given, else {})."""
    finished, unfinished, sweep = [], [], {}
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            folders = [path]
        else:
            folders = sorted(p.parent for p in path.glob("*/config.yaml"))
            if (path / "sweep.json").is_file() and len(paths) == 1:
                sweep = json.loads((path / "sweep.json").read_text())
            if not folders:
                raise ValueError(f"{path}: no run folder (config.yaml) there or one level below")
        for folder in folders:
            (finished if (folder / "summary.json").is_file() else unfinished).append(folder)
    return finished, unfinished, sweep


def metric_value(run: Run, metric: str, goal: str) -> float:
    if f"best/{metric}" in run.summary:
        return float(run.summary[f"best/{metric}"])
    if metric in run.summary and not metric.startswith("val/"):
        return float(run.summary[metric])
    if metric in run.curves:
        values = run.curves[metric].dropna()
        if len(values):
            return float(values.max() if goal == "maximize" else values.min())
    return math.nan


def differing_keys(runs: list[Run]) -> list[str]:
    keys = dict.fromkeys(k for run in runs for k in run.config)  # ordered, first seen first
    return [k for k in keys if not k.startswith(IGNORED_KEYS)
            and len({json.dumps(run.config.get(k), sort_keys=True, default=str) for run in runs}) > 1]


def comparison_frame(runs: list[Run], metric: str, goal: str, keys: list[str]) -> pd.DataFrame:
    """One row per run, best first; NaN metrics last."""
    rows = []
    for run in runs:
        row = {"run": run.name, **{k: run.config.get(k, ABSENT) for k in keys}, metric: metric_value(run, metric, goal)}
        row.update({k: v for k, v in run.summary.items() if k != metric})
        row["dir"] = str(run.dir)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(metric, ascending=goal == "minimize", na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def comparison_table(frame: pd.DataFrame, metric: str, goal: str, keys: list[str]) -> str:
    columns = ["run", *keys, metric, *(m for m in TABLE_METRICS if m in frame and m != metric)]
    arrow = "↑" if goal == "maximize" else "↓"
    headers = ["#", *(f"{c} {arrow}" if c == metric else c for c in columns)]
    rows = [{"#": i + 1, **row} for i, row in enumerate(frame.to_dict("records"))]
    return markdown_table(rows, ["#", *columns], headers)


def plot_overlaid_curves(runs: list[Run], best: str, metric: str, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        style = {"linewidth": 2.5, "zorder": 3} if run.name == best else {"linewidth": 1, "alpha": 0.8}
        if metric in run.curves:
            val = run.curves.dropna(subset=[metric])
            left.plot(val["epoch"] + 1, val[metric], marker="o", markersize=3, label=run.name, **style)
        if "train/loss" in run.curves:
            loss = run.curves.dropna(subset=["train/loss"])
            right.plot(loss["step"], loss["train/loss"], marker="o" if len(loss) < 20 else None, markersize=3,
                       label=run.name, **style)
    left.set(xlabel="epoch", ylabel=metric, title="validation (bold: the best run)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="step", ylabel="train/loss", title="training loss")
    if len(runs) <= 12:
        left.legend(fontsize="small")
    save_figure(fig, path)


def plot_metric_vs_params(frame: pd.DataFrame, params: list[str], metric: str, path: Path) -> None:
    params = params or ["run"]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, key in zip(axes[0], params):
        x, y = frame[key], frame[metric]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
        if numeric:
            ax.scatter(x, y)
            positive = [v for v in x if v > 0]
            if len(positive) == len(x) and min(positive) > 0 and max(positive) / min(positive) >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in x})
            ax.scatter([labels.index(str(v)) for v in x], y)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
        best_x = frame[key].iloc[0]
        ax.scatter([best_x if numeric else sorted({str(v) for v in x}).index(str(best_x))], [y.iloc[0]],
                   marker="*", s=200, color="tab:red", zorder=3, label="best")
        ax.set(xlabel=key, ylabel=metric)
    axes[0][0].legend(fontsize="small")
    save_figure(fig, path)


def compare(paths: list[str | Path], out: str | Path | None = None, metric: str | None = None,
            goal: str | None = None) -> tuple[pd.DataFrame, str]:
    """Write the table and plots; return the table (best first) and its Markdown with a note on
    where everything went (what the command line prints)."""
    finished, unfinished, sweep = find_runs(paths)
    if not finished:
        raise ValueError("no finished run (summary.json) to compare")
    metric = metric or sweep.get("metric", {}).get("name", "val/ndcg@10")
    goal = goal or sweep.get("metric", {}).get("goal", "maximize")
    out = Path(out) if out else Path(paths[0]) if sweep else Path("comparison")
    runs = [load_run(folder) for folder in finished]
    keys = differing_keys(runs)
    params = [k for k in sweep.get("parameters", keys) if k in keys] or keys
    frame = comparison_frame(runs, metric, goal, keys)

    table = comparison_table(frame, metric, goal, keys)
    note = f"\n\n{len(unfinished)} unfinished run(s) left out: " + ", ".join(p.name for p in unfinished) if unfinished else ""
    write_text(out / "comparison.md", f"{table}{note}\n")
    write_text(out / "comparison.csv", frame.to_csv(index=False))
    plot_overlaid_curves(runs, frame["run"].iloc[0], metric, out / "val_curves.png")
    plot_metric_vs_params(frame, params, metric, out / "metric_vs_params.png")
    return frame, f"{table}{note}\n\nbest: {frame['run'].iloc[0]} ({metric} {frame[metric].iloc[0]:.4f}); written to {out}/" \
        "{comparison.md,comparison.csv,val_curves.png,metric_vs_params.png}"
