"""The command line end to end, in subprocesses: fit writes a complete run folder (W&B offline),
evaluate reproduces the test (and cold_valid) metrics from the checkpoint, and bad input fails cleanly."""
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
    assert SUMMARY_KEYS <= set(summary)
    assert all({k.replace("test/", f"{held_out}/") for k in SUMMARY_KEYS} <= set(summary) for held_out in ("cold_valid", "cold"))
    assert all(0.0 <= summary[k] <= 1.0 for k in SUMMARY_KEYS)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "curves.png").stat().st_size > 0
    assert "val/ndcg@10" in (run / "metrics.csv").read_text().splitlines()[0]
    assert "mode: id+text" in (run / "config.yaml").read_text()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "a W&B offline run was written"
    assert "popularity (test)" in fit.stdout

    assert "cold_valid" in fit.stdout
    for split in ("test", "cold_valid"):
        evaluate = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
                            "--split", split, cwd=tmp_path)
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]
        row = next(line for line in evaluate.stdout.splitlines() if line.startswith(f"| model ({split})"))
        assert float(row.split("|")[3]) == pytest.approx(summary[f"{split}/ndcg@10"], abs=5e-5)


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


def test_every_command_explains_itself_with_runnable_examples(tmp_path):
    from twotower.cli import COMMANDS

    top = twotower("--help", cwd=tmp_path)
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS)
    for name in COMMANDS:
        shown = twotower(name, "--help", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr[-2000:]
        examples = shown.stdout.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert len(examples) >= 2 and all(e.strip().startswith(("twotower ", "curl ")) for e in examples), name
    fit_help = twotower("fit", "--help", cwd=tmp_path).stdout
    assert "model.item.train_layers=" in fit_help and "trainer.lr=" in fit_help  # every key, with its default


def test_version_and_the_old_module_entry_point(tmp_path):
    from twotower import __version__

    version = twotower("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"twotower {__version__}" and __version__ != "0+unknown"
    import subprocess
    import sys
    from pathlib import Path

    old = subprocess.run([sys.executable, "-m", "trainers", "fit"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60)
    assert old.returncode != 0 and "python -m twotower" in old.stderr


def test_config_show_prints_the_resolved_config_documented_and_loadable(tmp_path):
    from twotower.configs import load_config

    shown = twotower("config", "show", "-c", "trainer/ddp_cpu_2proc", "model.dim=48", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "  # Size of the shared item/user vector space.\n  dim: 48\n" in shown.stdout
    (tmp_path / "shown.yaml").write_text(shown.stdout)
    again = load_config([tmp_path / "shown.yaml"])
    assert again == load_config(["trainer/ddp_cpu_2proc"], ["model.dim=48"]) and again.model.dim == 48
    assert again.trainer.devices == 2  # from the packaged group, found by name outside the repository


def test_config_files_resolve_by_group_name_and_an_existing_path_wins(tmp_path):
    from twotower.configs import ConfigError, load_config
    from twotower.configs.loader import config_path

    found = {config_path(name).resolve() for name in ("trainer/ddp", "trainer/ddp.yaml", "configs/trainer/ddp.yaml")}
    assert len(found) == 1
    assert config_path("trainer/ddp").is_file() and config_path("trainer/ddp").parent.parent.name == "configs"
    mine = tmp_path / "trainer" / "ddp.yaml"
    mine.parent.mkdir()
    mine.write_text("trainer:\n  max_epochs: 7\n")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load_config(["trainer/ddp.yaml"]).trainer.max_epochs == 7  # the file here, not the packaged one
    finally:
        os.chdir(cwd)
    with pytest.raises(ConfigError, match=r"'trainer/dpp' not found .*did you mean trainer/ddp"):
        load_config(["trainer/dpp"])


def test_progress_messages_go_to_stderr_and_quiet_silences_them(tiny_overrides, tmp_path):
    first = twotower("prepare", *tiny_overrides, cwd=tmp_path)
    quiet = twotower("--quiet", "prepare", *tiny_overrides, cwd=tmp_path)
    loud = twotower("prepare", *tiny_overrides, cwd=tmp_path)
    assert first.returncode == quiet.returncode == loud.returncode == 0, first.stderr[-2000:]
    assert "twotower prepare: wrote" in first.stderr and first.stdout == ""
    assert "twotower prepare: " not in quiet.stderr
    assert "twotower prepare: " in loud.stderr and "is up to date" in loud.stderr
