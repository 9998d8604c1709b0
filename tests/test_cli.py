"""The command line end to end, in subprocesses: fit writes a complete run folder (W&B offline),
evaluate reproduces the test metrics from the checkpoint, and bad input fails cleanly."""
import json

import pytest

from helpers import twotower

SUMMARY_KEYS = {f"test/{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (10, 20)}


@pytest.mark.slow
def test_fit_writes_a_run_folder_and_evaluate_reproduces_it(tiny_overrides, tmp_path):
    fit = twotower("fit", *tiny_overrides, "model.mode=id+text", "split.cold_item_fraction=0.1",
                   "logger.wandb.mode=offline", "run.name=cli-test", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and {k.replace("test/", "cold/") for k in SUMMARY_KEYS} <= set(summary)
    assert all(0.0 <= summary[k] <= 1.0 for k in SUMMARY_KEYS)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "curves.png").stat().st_size > 0
    assert "val/ndcg@10" in (run / "metrics.csv").read_text().splitlines()[0]
    assert "mode: id+text" in (run / "config.yaml").read_text()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "a W&B offline run was written"
    assert "popularity (test)" in fit.stdout

    evaluate = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
                        "--split", "test", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    row = next(line for line in evaluate.stdout.splitlines() if line.startswith("| model (test)"))
    assert float(row.split("|")[3]) == pytest.approx(summary["test/ndcg@10"], abs=5e-5)


def test_unknown_key_fails_before_any_work_naming_the_key(tmp_path):
    result = twotower("fit", "trainer.max_epoch=1", f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "trainer.max_epochs" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_fails_with_file_line_and_problem(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\na,Alpha\n")
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\nu,a,yesterday-ish\n")
    result = twotower("prepare", "data.source=table", "data.interactions=inter.csv", "data.items=items.csv",
                      "data.text_fields=[title]", cwd=tmp_path)
    assert result.returncode == 2 and "inter.csv" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr
