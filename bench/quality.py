"""Recommendation quality on a folder of `interactions.csv` + `items.csv` (default: MovieLens-100K):
the popularity baseline and the `id`, `text` and `id+text` modes, each trained to early stopping on
val/ndcg@10 with its best checkpoint restored, ranked by the evaluation protocol of docs/data.md, in
one table.

    python bench/quality.py                                  # ../shared/data/ml-100k, all four systems
    python bench/quality.py --cold                           # also cold_valid and cold (split.cold_item_fraction=0.1)
    python bench/quality.py --seeds 3                        # each mode with seeds 0, 1, 2, and their mean and sd
    python bench/quality.py --modes popularity,id --patience 5 --max-epochs 50 model.dim=128
    python bench/quality.py --data /path/to/ml-100k          # a folder with interactions.csv and items.csv
    python bench/quality.py -c experiment/amazon_office --cold   # another data set: its config (and its data.path)
    python bench/quality.py -c experiment/amazon_office --data DIR   # that config on the same files elsewhere
    python bench/quality.py --modes id --features none,time_gaps,actions   # the user tower's features, each alone
    python bench/quality.py --synthetic data.synthetic.stray_fraction=0.3 --features none,actions  # the built-in data
    python bench/quality.py --quick [model.item.encoder=DIR] # a smoke run on tiny built-in synthetic data

Each model is one in-process `twotower fit` (run folder under `<out>/runs/<system>`, or
`<system>-seed<S>` with --seeds; a system is a mode plus the user-tower features it reads, as in
`id+actions`); `key=value` overrides go to every fit. `--features` trains each mode once per
feature set (`none`, `time_gaps`, `actions`, `time_gaps+actions`). With `--seeds K` each mode
trains K times (seed 0..K-1) and the table adds, per mode and split, the mean over seeds with the
sample standard deviation of NDCG@10: one seed's noise on 943 users is as large as many of the
differences a recipe change makes. The table (valid, test, and with held-out items cold_valid and
cold: HR/NDCG/MRR@10/20, best epoch, wall time to the best checkpoint, peak RSS) is printed and
written, with the protocol it ran, to `<out>/quality.md`, `quality.csv` and `quality.png` (default
out: bench/results/quality/<time>-<data>). cold_valid is the held-out half for choosing settings,
cold the half for reporting (docs/data.md, "Cold start").

`-c CONFIG` (a file, or a packaged name such as experiment/amazon_office; default: the ML-100K
experiment config) is the config of every fit; its data is read as `data.source=table` from `--data
DIR` (DIR/interactions.csv and DIR/items.csv), or, without --data, from the config's `data.path`
(relative paths from the repository root).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.files import write_text  # noqa: E402
from twotower.tables import csv_table, markdown_table  # noqa: E402

from bench.process_memory import peak_rss_mb, reset_peak_rss  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-100k"
ML100K_CONFIG = REPO / "configs" / "experiment" / "ml100k.yaml"
ML100K_NAME = "experiment/ml100k"
"The default config, as -c names it."
TABLES = ("interactions.csv", "items.csv")
"What a data folder holds (data.source=table)."
HELD_OUT = ("cold_valid", "cold")
"The held-out items' splits: for choosing settings, for reporting."
MODES = ("popularity", "id", "text", "id+text")
FEATURES = ("time_gaps", "actions")
"The user tower's optional features (model.user.<name>)."
COLD_FRACTION = 0.1
QUICK = ["data.name=quality_quick", "data.synthetic.num_users=300", "data.synthetic.num_items=120",
         "data.synthetic.mean_events=15", "data.max_text_len=16", "data.max_len=20", "data.batch_size=64",
         "data.shuffle_buffer=50", "model.dim=32", "model.loss.num_negatives=32", "trainer.warmup_steps=2"]
"--quick: a few hundred synthetic users (tests/conftest.py's `tiny` sizes); 2 epochs unless --max-epochs."
COLUMNS = ("system", "split", "seed", "hr@10", "ndcg@10", "ndcg@10_sd", "mrr@10", "hr@20", "ndcg@20", "mrr@20",
           "best_epoch", "epochs", "wall_to_best_s", "wall_s", "peak_rss_mb")
"""quality.csv's columns. `best_epoch` is 1-based; `epochs` is how many ran before early stopping or max_epochs.
`seed` is the fit's seed, or `mean` for the mean over --seeds fits (then `ndcg@10_sd` is their sample sd)."""
AVERAGED = [c for c in COLUMNS if c not in ("system", "split", "seed", "ndcg@10_sd")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help=f"the config of every fit: a file or a packaged name (default: {ML100K_NAME})")
    parser.add_argument("--data", help="folder with interactions.csv and items.csv (default: the config's data.path; "
                        f"without -c {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny built-in synthetic data instead of ML-100K")
    parser.add_argument("--synthetic", action="store_true", help="the built-in synthetic data at its configured size instead of ML-100K")
    parser.add_argument("--features", default="none", help="comma-separated feature sets per mode: none, or features of "
                        "%s joined by + (default: none: those of the config)" % ", ".join(FEATURES))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from %s (default: all)" % ",".join(MODES))
    parser.add_argument("--patience", type=int, help="trainer.patience: epochs without a better val/ndcg@10 (default: the config's; --quick 1)")
    parser.add_argument("--max-epochs", type=int, help="trainer.max_epochs (default: the config's; --quick 2)")
    parser.add_argument("--seeds", type=int, default=1, help="fits per mode, seeds 0..K-1, with their mean and sd (default: 1)")
    parser.add_argument("--cold", action="store_true", help=f"split.cold_item_fraction={COLD_FRACTION}: also rank cold_valid and cold")
    parser.add_argument("--out", help="results folder (default: bench/results/quality/<time>-<ml100k|config name|data folder|quick>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every fit (and the data)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown or 'empty'}; choose from {','.join(MODES)}")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    args.features = [f.strip() for f in args.features.split(",") if f.strip()]
    wrong = [f for f in args.features if f != "none" and not set(f.split("+")) <= set(FEATURES)]
    if wrong or not args.features:
        parser.error(f"--features: unknown {wrong or 'empty'}; none, or features of {', '.join(FEATURES)} joined by +")
    if args.quick and args.synthetic:
        parser.error("--quick and --synthetic: choose one")
    if args.data and (args.quick or args.synthetic):
        parser.error("--data and --quick/--synthetic: choose one (those run the built-in data)")
    return args


def feature_overrides(features: str) -> list[str]:
    """`model.user.*` overrides that turn on exactly `features` (none: leave the config's)."""
    return [] if features == "none" else [f"model.user.{f}={str(f in features.split('+')).lower()}" for f in FEATURES]


def system_name(cfg) -> str:
    """The mode plus the user-tower features it reads: `id`, `id+actions`, `text+time_gaps+actions`."""
    return "+".join([cfg.model.mode, *(f for f in FEATURES if getattr(cfg.model.user, f))])


def best_epoch(metrics_csv: Path, monitor: str) -> tuple[int, dict[str, float]]:
    """(1-based epoch, its `val/` metrics) of the first epoch with the highest `monitor`: the epoch
    whose checkpoint ModelCheckpoint kept (it replaces the best only on a strict improvement)."""
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(monitor)]
    best = max(rows, key=lambda r: float(r[monitor]))  # max returns the first of equal maxima
    return int(best["epoch"]) + 1, {k: float(v) for k, v in best.items() if k.startswith("val/") and v}


def fit_mode(cfg, monitor: str) -> list[dict]:
    """One `twotower fit` in this process; its rows (valid, test, cold_valid, cold) read back from the run folder."""
    from twotower.trainers.fit import fit

    run_dir = Path(cfg.run.dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale best.ckpt would make Lightning write best-v1.ckpt
    reset_peak_rss()
    started = time.time()
    summary = fit(cfg)
    peak = peak_rss_mb()
    best_ckpt = run_dir / "checkpoints" / "best.ckpt"  # written (atomically) when the best epoch ended
    epoch, valid = best_epoch(run_dir / "metrics.csv", monitor)
    common = {"system": system_name(cfg), "mode": cfg.model.mode, "seed": cfg.seed, "best_epoch": epoch, "epochs": summary["epochs"],
              "wall_to_best_s": best_ckpt.stat().st_mtime - started, "wall_s": summary["wall_s"], "peak_rss_mb": peak}
    rows = [{**common, "split": "valid", **{k.split("/", 1)[1]: v for k, v in valid.items()}}]
    for split in ("test", *HELD_OUT):
        if f"{split}/ndcg@10" in summary:
            rows.append({**common, "split": split, **{k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{split}/")}})
    return rows


def popularity_rows(cfg, splits: list[str]) -> list[dict]:
    """Items by training count, ranked by the same code as the models (trainers/evaluate.py)."""
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.trainers.evaluate import popularity_metrics

    data = ShardDataModule(cfg)
    rows = []
    for split in splits:
        started = time.time()
        metrics = popularity_metrics(data, split)
        rows.append({"system": "popularity", "mode": "popularity", "split": split, **{k.split("/", 1)[1]: v for k, v in metrics.items()},
                     "wall_s": time.time() - started})
    return rows


def seed_means(rows: list[dict]) -> list[dict]:
    """Per (system, split) fitted with more than one seed: the mean of each number over the seeds,
    and the sample standard deviation of NDCG@10."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("seed") is not None:
            groups.setdefault((row["system"], row["split"]), []).append(row)
    means = []
    for (system, split), group in groups.items():
        if len(group) > 1:
            ndcg = [r["ndcg@10"] for r in group]
            mean = sum(ndcg) / len(ndcg)
            sd = (sum((x - mean) ** 2 for x in ndcg) / (len(ndcg) - 1)) ** 0.5
            means.append({"system": system, "mode": group[0]["mode"], "split": split, "seed": "mean", "ndcg@10_sd": sd,
                          **{c: sum(r[c] for r in group) / len(group) for c in AVERAGED if all(c in r for r in group)}})
    return means


def protocol(cfg, manifest: dict, args: argparse.Namespace, source: str) -> str:
    counts, t = manifest["counts"], cfg.trainer
    cold = (f" Cold: split.cold_item_fraction={cfg.split.cold_item_fraction}: {counts['cold_items']} items held out of "
            f"training entirely, cut in two (split.cold_valid_share={cfg.split.cold_valid_share}): "
            f"{counts.get('cold_valid_items', 0)} for cold_valid (to choose settings on), the rest for cold (to report); "
            f"each ranks, for each user who touched an item of its half ({counts.get('cold_valid', 0)} and "
            f"{counts['cold']} users), the first such item given the warm items before it."
            if cfg.split.cold_item_fraction > 0 else " No cold splits (split.cold_item_fraction=0; --cold sets 0.1).")
    return (
        f"Data: {source}; {counts['interactions']} interactions, {counts['users']} users, {counts['items']} items.\n"
        f"Protocol (docs/data.md): leave-one-out by time (per user: last interaction = test, second last = valid, the rest = "
        f"train; ties keep file order; users with < {cfg.split.min_interactions} interactions dropped: "
        f"{counts['dropped_users']}); full ranking over all {counts['items']} items, no sampled negatives; the user's "
        f"input history filtered (eval.filter_seen={str(cfg.eval.filter_seen).lower()}), the target never; ties count "
        f"against the target; HR/NDCG/MRR@{'/'.join(map(str, cfg.eval.ks))} averaged over all users: "
        f"{counts['valid']} valid, {counts['test']} test.{cold}\n"
        f"Training: each system (a mode, plus the user-tower features it reads) is `twotower fit` (seed {', '.join(map(str, range(args.seeds)))}) to early stopping on val/ndcg@10 (trainer.patience="
        f"{t.patience}, trainer.max_epochs={t.max_epochs}); valid and test are the restored best checkpoint's. Popularity: "
        f"training counts, ranked by the same code. best_epoch is 1-based; wall_to_best_s runs from the start of `fit` "
        f"(after the shared prepare) to the write of the best checkpoint; peak_rss_mb is this process's peak RSS during "
        f"that fit (VmHWM, reset before each fit; the fits run one after another in one process).\n"
        f"Command: python bench/quality.py {' '.join(args.argv)}\n"
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch threads "
        f"{__import__('torch').get_num_threads()}, Python {platform.python_version()}.")


def markdown(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    return markdown_table(rows, columns)


def plot(rows: list[dict], path: Path, ks: list[int]) -> None:
    """One panel per split, HR/NDCG/MRR at each cut-off, one bar per system."""
    from twotower.trainers.run_folder import plt, save_figure

    splits = list(dict.fromkeys(r["split"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    names = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), squeeze=False)
    width = 0.8 / len(systems)
    for ax, split in zip(axes[0], splits):
        for i, system in enumerate(systems):
            row = next((r for r in rows if r["system"] == system and r["split"] == split), None)
            if row:
                ax.bar([j + i * width for j in range(len(names))], [row[n] for n in names], width, label=system)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.upper() for n in names], rotation=30)
        ax.set(title=split)
    axes[0][0].legend(fontsize="small")
    save_figure(fig, path)


def data_folder(args: argparse.Namespace) -> Path:
    """The folder of interactions.csv and items.csv: --data, else the -c config's `data.path`
    (relative: from the repository root), else ML-100K's default place."""
    if args.data:
        return Path(args.data).resolve()
    if not args.config:
        return DEFAULT_DATA.resolve()
    from twotower.configs import load_config

    path = load_config([args.config]).data.path
    if path is None:
        raise ValueError(f"{args.config}: no data.path; give --data DIR (a folder with {' and '.join(TABLES)})")
    return (REPO / path).resolve()  # an absolute path stays as it is


def data_setup(args: argparse.Namespace) -> tuple[list[str], list[str], str, str]:
    """(config files, overrides, a line naming the data, a short name for the results folder) of
    the fits. Raises FileNotFoundError naming the folder when a data table is missing."""
    files = [args.config] if args.config else []
    if args.quick:
        overrides = [*QUICK, "data.source=synthetic", f"trainer.max_epochs={2 if args.max_epochs is None else args.max_epochs}",
                     f"trainer.patience={1 if args.patience is None else args.patience}"]
        return files, overrides, "built-in synthetic data (--quick)", "quick"
    overrides = [f"trainer.patience={args.patience}"] if args.patience is not None else []
    overrides += [f"trainer.max_epochs={args.max_epochs}"] if args.max_epochs is not None else []
    if args.synthetic:
        return files, ["data.name=quality_synthetic", "data.source=synthetic", *overrides], "built-in synthetic data", "synthetic"
    data = data_folder(args)
    missing = [n for n in TABLES if not (data / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no {'data' if args.data or args.config else 'ML-100K'} at {data} (missing {', '.join(missing)})")
    config = args.config or ML100K_NAME
    tables = ["data.source=table", f"data.path={data}", f"data.interactions={data / TABLES[0]}", f"data.items={data / TABLES[1]}"]
    kind = Path(args.config).stem if args.config else data.name if args.data else "ml100k"
    return files or [str(ML100K_CONFIG)], [*tables, *overrides], f"{data} (config {config})", kind


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from twotower.configs import ConfigError, load_config

    try:
        files, overrides, source, kind = data_setup(args)
    except FileNotFoundError as exc:
        print(f"bench/quality.py: skipped: {exc}; give --data DIR (with {' and '.join(TABLES)}), or --quick for a smoke run",
              file=sys.stderr)
        return 2 if args.data or args.config else 0
    except (ConfigError, ValueError) as exc:
        print(f"bench/quality.py: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO / "bench" / "results" / "quality" / f"{stamp}-{kind}").resolve()
    overrides += [f"split.cold_item_fraction={COLD_FRACTION}"] if args.cold else []
    overrides += [f"data.dir={out / 'data'}", *args.overrides]

    try:
        base = load_config(files, overrides)
        fits = []
        for mode in args.modes:
            for features in args.features if mode != "popularity" else []:
                name = system_name(load_config(files, [*overrides, f"model.mode={mode}", *feature_overrides(features)]))
                fits += [load_config(files, [*overrides, f"model.mode={mode}", *feature_overrides(features), f"seed={seed}",
                                             f"run.dir={out / 'runs' / (name if args.seeds == 1 else f'{name}-seed{seed}')}"])
                         for seed in range(args.seeds)]
    except ConfigError as exc:
        print(f"bench/quality.py: config error: {exc}", file=sys.stderr)
        return 2
    from twotower.datamodules.prepare import prepare, read_manifest
    from twotower.trainers.fit import MONITOR

    prepare(base)  # once; every fit then finds the shards up to date
    manifest = read_manifest(base.data.dir)
    splits = ["valid", "test"] + [split for split in HELD_OUT if manifest["counts"].get(split)]
    rows = popularity_rows(base, splits) if "popularity" in args.modes else []
    for cfg in fits:
        rows += fit_mode(cfg, MONITOR)
    means = seed_means(rows)
    rows += means
    rows.sort(key=lambda r: (splits.index(r["split"]), args.modes.index(r["mode"]), r["system"], str(r.get("seed"))))

    table, text = markdown(rows), protocol(base, manifest, args, source)
    write_text(out / "quality.md", f"# Recommendation quality\n\n{table}\n\n{text}\n\n![quality](quality.png)\n")
    write_text(out / "quality.csv", csv_table(rows, COLUMNS))
    plot([r for r in rows if args.seeds == 1 or r.get("seed") in (None, "mean")], out / "quality.png", list(base.eval.ks))
    print(f"\n{table}\n\n{text}\n\nwritten to {out}/{{quality.md,quality.csv,quality.png}}; run folders in {out / 'runs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
