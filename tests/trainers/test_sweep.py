"""Sweeps and comparison: a 4-trial local grid on tiny data (W&B offline, 2 trials at a time),
`compare` over it, resuming, repeating a run from its config.yaml; and the shipped W&B sweep files."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml

from twotower.cli import build_parser
from twotower.configs import load_config
from twotower.trainers.sweep import ARGS_MACRO, agent_overrides, load_sweep, make_trials, override, split_config_args, trial_argv

from helpers import twotower

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILES = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
TINY_SWEEP = {
    "name": "tiny", "method": "grid", "metric": {"name": "val/ndcg@10", "goal": "maximize"},
    "parameters": {"trainer.lr": {"values": [0.0003, 0.01]}, "model.dim": {"values": [16, 32]}},
    "command": ["${env}", "twotower", "fit", "logger.wandb.tags=[sweep,tiny]", ARGS_MACRO],
}


def swept(tiny_overrides: list[str], cache: Path) -> Path:
    """The tiny sweep, run once per session (the `done` marker is written last)."""
    sweep_dir = cache / "sweep"
    if (cache / "done").is_file():
        return sweep_dir
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "tiny.yaml").write_text(yaml.safe_dump(TINY_SWEEP, sort_keys=False))
    overrides = [o for o in tiny_overrides if not o.startswith(("data.dir=", "run.dir="))]
    result = twotower("sweep", str(cache / "tiny.yaml"), *overrides, f"data.dir={cache / 'data'}", "logger.wandb.mode=offline",
                      "--out", str(sweep_dir), "--parallel", "2", cwd=cache)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (cache / "done").touch()
    return sweep_dir


@pytest.fixture
def sweep_dir(tiny_overrides, tmp_path_factory) -> Path:
    return swept(tiny_overrides, tmp_path_factory.getbasetemp() / "tiny-sweep")


def best_val(run: Path) -> float:
    """A run's best val/ndcg@10, read from its own metrics.csv."""
    return pd.read_csv(run / "metrics.csv")["val/ndcg@10"].max()


@pytest.mark.slow
def test_local_sweep_then_compare_ranks_the_best_trial_first(sweep_dir, tmp_path):
    runs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [r.name for r in runs] == ["lr=0.0003,dim=16", "lr=0.0003,dim=32", "lr=0.01,dim=16", "lr=0.01,dim=32"]
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["run"]["name"] == run.name and config["logger"]["wandb"]["group"] == "tiny"
        assert config["trainer"]["num_threads"] == 1, "2 cores / 2 trials at a time"
        records = [f.read_bytes() for f in (run / "wandb").glob("offline-run-*/run-*.wandb")]
        assert len(records) == 1, "each trial is its own W&B offline run"
        # wandb 0.31 has no reader for its offline record file; its keys are stored as plain bytes
        for key in (b"best/val/ndcg@10", b"test/ndcg@10", b"run_info", b"train/grad_norm", b"params/total", b"tiny"):
            assert key in records[0], key
        info = json.loads((run / "run_info.json").read_text())
        assert info["seed"] == 0 and info["packages"]["torch"] and "commit" in info["git"] and "dirty" in info["git"]
        assert info["config"] == config
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["metric"] == {"name": "val/ndcg@10", "goal": "maximize"} and {t["status"] for t in record["trials"]} == {"done"}

    compared = twotower("compare", str(sweep_dir), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    for name in ("comparison.md", "comparison.csv", "val_curves.png", "metric_vs_params.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    values = {run.name: best_val(run) for run in runs}
    assert len(rows) == 4 and rows[0]["run"] == max(values, key=values.get)
    assert [float(r["val/ndcg@10"]) for r in rows] == pytest.approx(sorted(values.values(), reverse=True))
    assert {"trainer.lr", "model.dim"} <= set(rows[0]) and "run.dir" not in rows[0]
    table = (sweep_dir / "comparison.md").read_text()
    assert table.splitlines()[2].startswith(f"| 1 | {rows[0]['run']} |") and "val/ndcg@10 ↑" in table

    again = twotower("sweep", str(sweep_dir.parent / "tiny.yaml"), "--out", str(sweep_dir), "logger.wandb.mode=offline",
                     f"data.dir={sweep_dir.parent / 'data'}", cwd=sweep_dir.parent)
    assert again.returncode == 0 and "4 finished before, running 0" in again.stderr, again.stdout + again.stderr[-2000:]


@pytest.mark.slow
def test_fit_from_a_run_folders_config_repeats_its_metrics(sweep_dir, tmp_path):
    """Same seed, same config.yaml (threads included), same CPU: the same numbers."""
    original = sweep_dir / "lr=0.01,dim=16"
    repeat = twotower("fit", "-c", str(original / "config.yaml"), f"run.dir={tmp_path / 'repeat'}",
                      "logger.wandb.mode=disabled", cwd=tmp_path, threads=1)
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    first, second = (json.loads((run / "summary.json").read_text()) for run in (original, tmp_path / "repeat"))
    metrics = [k for k in first if k.startswith(("test/", "best/", "popularity/"))]
    assert len(metrics) >= 13 and {k: first[k] for k in metrics} == pytest.approx({k: second[k] for k in metrics}, abs=1e-6)
    curve = lambda run: pd.read_csv(run / "metrics.csv")["val/ndcg@10"].dropna().tolist()  # noqa: E731
    assert curve(original) == pytest.approx(curve(tmp_path / "repeat"), abs=1e-6)


def agent_command(sweep_file: Path, params: dict) -> list[str]:
    """The command line `wandb agent` runs for these parameter values (its macro substitution)."""
    command = []
    for part in yaml.safe_load(sweep_file.read_text())["command"]:
        if part == ARGS_MACRO:
            command += [override(k, v) for k, v in params.items()]
        else:
            command += {"${env}": ["/usr/bin/env"]}.get(part, [str(part)])
    return command


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_file_is_valid(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    raw = yaml.safe_load(sweep_file.read_text())
    assert sweep.metric == "val/ndcg@10" and sweep.goal == "maximize"
    assert sweep_file.read_text().startswith("# twotower sweep configs/sweep/"), "opens with the command that runs it"
    assert f"logger.wandb.group={sweep.name}" in raw["command"]
    trials = make_trials(sweep, n=4, seed=0)
    assert trials
    for trial in trials:
        command = agent_command(sweep_file, trial.params)  # what W&B runs
        assert command[:3] == ["/usr/bin/env", "twotower", "fit"], shlex.join(command)
        args = build_parser().parse_args(command[2:])
        cfg = load_config(args.config, args.overrides)
        for key, value in trial.params.items():  # each parameter is a config key, and reaches it
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == pytest.approx(value) if isinstance(value, float) else node == value, key
        local = trial_argv(sweep, trial, tmp_path, [], threads=1)  # what `twotower sweep` runs
        args = build_parser().parse_args(local)
        assert load_config(args.config, args.overrides).run.dir == str(tmp_path / trial.name)
        assert split_config_args(local[1:]) == (args.config, args.overrides)


def test_random_search_is_seeded_and_stays_in_its_ranges():
    sweep = load_sweep(ROOT / "configs" / "sweep" / "text_random.yaml")
    trials = make_trials(sweep, n=6, seed=3)
    assert [t.params for t in trials] == [t.params for t in make_trials(sweep, n=6, seed=3)]
    assert len({t.name for t in trials}) == 6
    for trial in trials:
        assert 3e-4 <= trial.params["trainer.lr"] <= 1e-2 and 0.0 <= trial.params["model.user.dropout"] <= 0.4
        assert trial.params["model.item.train_layers"] in (0, 1, 2)


def test_under_wandb_agent_fit_names_the_run_after_its_parameters(tmp_path):
    params = tmp_path / "config-abc123.yaml"
    params.write_text("wandb_version: 1\n\ntrainer.lr:\n  value: 0.003\nmodel.dim:\n  value: 64\n")
    env = {"WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "abc123", "WANDB_SWEEP_PARAM_PATH": str(params)}
    assert agent_overrides(env) == ["run.name=lr=0.003,dim=64", "run.dir=runs/sweeps/sw1/lr=0.003,dim=64-abc123",
                                    "logger.wandb.mode=online"]
    assert agent_overrides({}) == []
    cfg = load_config([], [*agent_overrides(env), "run.name=mine"])  # the command line still wins
    assert cfg.run.name == "mine" and cfg.logger.wandb.mode == "online"
