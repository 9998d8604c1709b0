"""bench/quality.py --quick end to end on the tiny random BERT: the Markdown, CSV and PNG are
written, and every number in the CSV is the one its run folder holds (summary.json, and
metrics.csv's best epoch for valid), read here independently of the bench's own code; and
bench/paired.py, on the same run, gives back the fit's numbers user by user."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"
METRICS = [f"{m}@{k}" for k in (10, 20) for m in ("hr", "ndcg", "mrr")]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_val_row(metrics_csv: Path) -> dict:
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val/ndcg@10"]]
    top = max(float(r["val/ndcg@10"]) for r in rows)
    return next(r for r in rows if float(r["val/ndcg@10"]) == top)


MODES = ("id+text",)
"The bench treats every mode alike; one keeps the run near 30 s on 2 cores."


@pytest.fixture(scope="module")
def quick(tiny_bert, tmp_path_factory) -> Path:
    """`bench/quality.py --quick --cold` into a results folder shared by this module's tests."""
    out = tmp_path_factory.mktemp("quality") / "results"
    assert load_bench().main(["--quick", "--cold", "--modes", "popularity," + ",".join(MODES), "--out", str(out),
                              f"model.item.encoder={tiny_bert}", "model.item.train_layers=-1"]) == 0
    return out


def test_quick_table_equals_the_runs(quick):
    out, modes = quick, MODES
    for name in ("quality.md", "quality.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))
    md = (out / "quality.md").read_text()
    assert "| system | split |" in md
    for stated in ("leave-one-out by time", "full ranking over all 120 items", "eval.filter_seen=true",
                   "300 valid, 300 test", "split.cold_item_fraction=0.1", "split.cold_valid_share=0.5",
                   "trainer.patience=1, trainer.max_epochs=2"):
        assert stated in md

    with open(out / "quality.csv", newline="") as f:
        rows = {(r["system"], r["split"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(s, split) for s in ("popularity", *modes) for split in ("valid", "test", "cold_valid", "cold")}
    for mode in modes:
        run = out / "runs" / mode
        summary = json.loads((run / "summary.json").read_text())
        for split in ("test", "cold_valid", "cold"):
            for name in METRICS:
                assert float(rows[(mode, split)][name]) == summary[f"{split}/{name}"], (mode, split, name)
                assert float(rows[("popularity", split)][name]) == pytest.approx(summary[f"popularity/{split}/{name}"], abs=1e-12)
        best = best_val_row(run / "metrics.csv")
        valid = rows[(mode, "valid")]
        assert float(valid["ndcg@10"]) == pytest.approx(summary["best/val/ndcg@10"], rel=1e-6)
        assert all(float(valid[name]) == float(best[f"val/{name}"]) for name in METRICS)
        assert int(valid["best_epoch"]) == int(best["epoch"]) + 1
        assert int(valid["epochs"]) == summary["epochs"] and 1 <= int(valid["best_epoch"]) <= summary["epochs"]
        assert 0 < float(valid["wall_to_best_s"]) <= float(valid["wall_s"]) == summary["wall_s"]
        assert float(valid["peak_rss_mb"]) > 0


def test_paired_ranks_are_the_runs_and_their_errors_are_the_textbook_ones(quick, tmp_path, capsys):
    """bench/paired.py re-ranks the quick run's users: each system's per-user ranks give back the
    NDCG@10 that the fit (and its popularity baseline) reported, and the table's standard errors
    and paired differences are the textbook ones, recomputed here from the per-user CSV."""
    import statistics

    import pandas as pd

    spec = importlib.util.spec_from_file_location("bench_paired", BENCH.with_name("paired.py"))
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    run = quick / "runs" / "id+text"
    assert paired.main([str(run), "--out", str(tmp_path / "per_user.csv")]) == 0
    printed = capsys.readouterr().out
    users = pd.read_csv(tmp_path / "per_user.csv", dtype={"user_id": str})
    summary = json.loads((run / "summary.json").read_text())

    def ndcg(ranks) -> list[float]:  # docs/data.md: one target, 0-based rank
        return [1 / math.log2(r + 2) if r < 10 else 0.0 for r in ranks]

    for split, key in (("test", "test/ndcg@10"), ("valid", "best/val/ndcg@10")):
        mine = users[(users.split == split) & (users.system == "id+text")]
        pop = users[(users.split == split) & (users.system == "popularity")]
        assert len(mine) == len(pop) == 300 and list(mine.user_id) == list(pop.user_id)
        assert statistics.fmean(ndcg(mine["rank"])) == pytest.approx(summary[key], abs=1e-6)
        if split == "test":
            assert statistics.fmean(ndcg(pop["rank"])) == pytest.approx(summary["popularity/test/ndcg@10"], abs=1e-12)
        diff = [a - b for a, b in zip(ndcg(pop["rank"]), ndcg(mine["rank"]))]
        row = f"| {split} | all | 300 | popularity | {statistics.fmean(ndcg(pop['rank'])):.4f} | " \
              f"{statistics.stdev(ndcg(pop['rank'])) / math.sqrt(300):.4f} | {statistics.fmean(diff):.4f} | " \
              f"{statistics.stdev(diff) / math.sqrt(300):.4f} |"
        assert row in printed, (row, printed)


def test_missing_data_skips_or_fails_with_the_path(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "DEFAULT_DATA", tmp_path / "absent")
    assert bench.main([]) == 0  # the default location: a clear skip
    assert f"skipped: no ML-100K at {tmp_path / 'absent'}" in capsys.readouterr().err
    assert bench.main(["--data", str(tmp_path)]) == 2  # a folder the user named: an error
    assert "missing interactions.csv, items.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--modes", "id,sasrec"])


def test_any_folder_of_tables_with_the_config_to_use(tmp_path, monkeypatch, capsys):
    """-c and --data: the config's files, the folder's tables as data.source=table; without --data
    the config's own data.path, from the repository root."""
    from twotower.configs import load_config

    bench = load_bench()
    for name in ("interactions.csv", "items.csv"):
        (tmp_path / name).write_text("")
    args = bench.parse_args(["-c", "experiment/amazon_office", "--data", str(tmp_path)])
    files, overrides, source, kind = bench.data_setup(args)
    cfg = load_config(files, overrides)
    assert (cfg.data.source, cfg.data.interactions, cfg.data.items) == ("table", str(tmp_path / "interactions.csv"), str(tmp_path / "items.csv"))
    assert cfg.data.text_fields == ["title"] and kind == "amazon_office" and str(tmp_path) in source
    assert bench.data_folder(bench.parse_args(["-c", "experiment/amazon_office"])) == (BENCH.parents[1] / "../shared/data/amazon-office").resolve()
    monkeypatch.setattr(bench, "REPO", tmp_path / "elsewhere")  # the config's data.path then leads nowhere: an error naming it
    assert bench.main(["-c", "experiment/amazon_office"]) == 2
    assert f"no data at {(tmp_path / 'elsewhere' / '../shared/data/amazon-office').resolve()} (missing" in capsys.readouterr().err


def test_seed_means_average_each_number_and_give_the_sample_sd_of_ndcg():
    import statistics

    bench = load_bench()
    ndcgs, epochs = [0.11, 0.095, 0.102], [30, 41, 28]
    rows = [{"system": "id+actions", "mode": "id", "split": "test", "seed": s, "ndcg@10": n, "hr@10": 2 * n, "best_epoch": e}
            for s, (n, e) in enumerate(zip(ndcgs, epochs))]
    rows += [{"system": "id", "mode": "id", "split": "test", "seed": 0, "ndcg@10": 0.07, "hr@10": 0.14, "best_epoch": 9},
             {"system": "popularity", "mode": "popularity", "split": "test", "ndcg@10": 0.02}]
    (mean,) = bench.seed_means(rows)  # one seed of plain id and the seedless baseline get no mean row
    assert (mean["system"], mean["mode"], mean["split"], mean["seed"]) == ("id+actions", "id", "test", "mean")
    assert mean["ndcg@10"] == pytest.approx(statistics.fmean(ndcgs), abs=1e-15)
    assert mean["hr@10"] == pytest.approx(2 * statistics.fmean(ndcgs), abs=1e-15)
    assert mean["best_epoch"] == pytest.approx(statistics.fmean(epochs))
    assert mean["ndcg@10_sd"] == pytest.approx(statistics.stdev(ndcgs), abs=1e-15)
