"""`twotower sweep FILE`: run a W&B sweep file's trials on this machine, without a W&B server.

A sweep file (`configs/sweep/*.yaml`) is what `wandb sweep FILE` takes: `method`, `metric`,
`parameters` keyed by OmegaConf dotlist keys, and a `command` that runs `twotower fit`, its fixed
arguments, then `${args_no_hyphens}` (which the W&B agent replaces by `key=value` per parameter).
Locally, each trial runs that same `fit` command line (`python -m twotower fit`), with the extra
overrides given to `twotower sweep` after the file's fixed arguments and the trial's `key=value`s
(formatted as the agent formats them) after those, in its own run folder `SWEEP_DIR/<name>`.

- `grid`: every combination of `values` (a `value` counts as one); `--trials N` keeps the first N.
- `random`: N draws (`--trials`, else the file's `run_cap`) from `values` or from `uniform`,
  `int_uniform`, `log_uniform_values` distributions, seeded by `--seed` so that a rerun draws the
  same trials. `bayes` needs the W&B server; locally it is sampled as `random`.
- Trials run one at a time, or `--parallel K` at once, each capped to (cores / K) torch threads.
- A trial whose folder has `summary.json` is finished and skipped: rerun the command to resume.
- The run name lists every parameter (`lr=0.001,dim=32`); the W&B group is the sweep's name.
  `SWEEP_DIR/sweep.json` records the file, the trials and their outcome (what `compare` reads).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from twotower.configs import ConfigError, load_config
from twotower.files import write_json

log = logging.getLogger(__name__)

ARGS_MACRO = "${args_no_hyphens}"
GOALS = ("maximize", "minimize")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values")
"The W&B distributions the local launcher can draw from."


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    name: str
    "The sweep's name (`name:` in the file, else the file's stem): the W&B group and the folder name."
    method: str
    "grid | random | bayes."
    metric: str
    "The metric the sweep optimises, as logged (e.g. val/ndcg@10)."
    goal: str
    "maximize | minimize."
    parameters: dict[str, dict]
    "Dotlist key -> W&B parameter spec (`value`, `values`, or `distribution` with `min`/`max`)."
    fixed_args: list[str]
    "The command's own arguments to `twotower fit` (config files, key=value), before the trial's."
    run_cap: int | None = None
    "Most runs (W&B `run_cap`); the local default number of random trials."


@dataclass
class Trial:
    name: str
    "Run name: every parameter's `key=value`, comma-separated."
    params: dict[str, Any]
    "Dotlist key -> this trial's value."
    status: str = "pending"
    "pending | running | done | failed."
    returncode: int | None = None
    wall_s: float | None = None
    argv: list[str] = field(default_factory=list)
    "The `twotower fit ...` arguments that run it."


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (with PyYAML, as `wandb sweep` does: write 1.0e-3, not 1e-3,
    for a float in exponent notation)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    raw = yaml.safe_load(path.read_text()) or {}

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    method = raw.get("method")
    if method not in ("grid", "random", "bayes"):
        raise fail(f"method={method!r}: expected grid, random or bayes")
    metric = raw.get("metric") or {}
    if not metric.get("name"):
        raise fail("metric.name is missing (e.g. val/ndcg@10)")
    goal = metric.get("goal", "minimize")  # the W&B default
    if goal not in GOALS:
        raise fail(f"metric.goal={goal!r}: expected maximize or minimize")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise fail("parameters: expected a mapping of config keys to W&B parameter specs")
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or "parameters" in spec:
            raise fail(f"parameters.{key}: expected a spec (value, values or a distribution); nest with dotted keys")
        distribution(key, spec)  # raises on an unsupported one
    return Sweep(name=str(raw.get("name") or path.stem), method=method, metric=metric["name"], goal=goal,
                 parameters=parameters, fixed_args=fixed_args(raw.get("command"), path), run_cap=raw.get("run_cap"))


def fixed_args(command: Any, path: Path) -> list[str]:
    """The arguments the command gives `fit` besides `${args_no_hyphens}`."""
    if not isinstance(command, list) or "fit" not in command or ARGS_MACRO not in command:
        raise ConfigError(f"{path}: command: expected a list that runs `twotower fit ... {ARGS_MACRO}`")
    args = [str(a) for a in command[command.index("fit") + 1:] if a != ARGS_MACRO]
    macros = [a for a in args if a.startswith("${")]
    if macros:
        raise ConfigError(f"{path}: command: {macros[0]} after `fit`: only {ARGS_MACRO} gives fit key=value arguments")
    return args


def distribution(key: str, spec: dict) -> str:
    """The spec's distribution, inferred as W&B infers it when not given."""
    if "distribution" in spec:
        name = spec["distribution"]
    elif "value" in spec:
        name = "constant"
    elif "values" in spec:
        name = "categorical"
    elif "min" in spec and "max" in spec:
        name = "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"
    else:
        raise ConfigError(f"parameters.{key}: expected value, values, or min and max")
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"parameters.{key}: distribution {name!r} is not supported by the local launcher "
                          f"({', '.join(DISTRIBUTIONS)}); it still works under `wandb agent`")
    return name


def grid_trials(parameters: Mapping[str, dict]) -> list[dict[str, Any]]:
    choices = []
    for key, spec in parameters.items():
        kind = distribution(key, spec)
        if kind not in ("constant", "categorical"):
            raise ConfigError(f"parameters.{key}: grid search needs value or values, not a {kind} distribution")
        choices.append([spec["value"]] if kind == "constant" else list(spec["values"]))
    return [dict(zip(parameters, combo)) for combo in itertools.product(*choices)]


def random_trials(parameters: Mapping[str, dict], n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def draw(key: str, spec: dict) -> Any:
        kind = distribution(key, spec)
        if kind == "constant":
            return spec["value"]
        if kind == "categorical":
            return rng.choice(list(spec["values"]))
        if kind == "int_uniform":
            return rng.randint(int(spec["min"]), int(spec["max"]))
        if kind == "uniform":
            return rng.uniform(float(spec["min"]), float(spec["max"]))
        return math.exp(rng.uniform(math.log(float(spec["min"])), math.log(float(spec["max"]))))  # log_uniform_values

    return [{key: draw(key, spec) for key, spec in parameters.items()} for _ in range(n)]


def override(key: str, value: Any) -> str:
    """`key=value` exactly as the W&B agent's `${args_no_hyphens}` writes it."""
    return f"{key}={value}"


def run_name(params: Mapping[str, Any]) -> str:
    """`lr=0.001,dim=32`: each key's last part (the full key where two would clash), with the
    value (floats to 4 significant digits), safe as a folder name."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    parts = []
    for key, short in zip(params, last):
        value = params[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{short if last.count(short) == 1 else key}={text}")
    return re.sub(r"[^\w.=,+@-]", "_", ",".join(parts))


def make_trials(sweep: Sweep, n: int | None = None, seed: int = 0) -> list[Trial]:
    if sweep.method == "grid":
        combos = grid_trials(sweep.parameters)[:n] if n else grid_trials(sweep.parameters)
    else:
        n = n or sweep.run_cap
        if not n:
            raise ConfigError(f"{sweep.method} search: give the number of trials (--trials N, or run_cap in the file)")
        combos = random_trials(sweep.parameters, n, seed)
    trials, seen = [], set()
    for params in combos:
        name = base = run_name(params)
        for i in itertools.count(2):
            if name not in seen:
                break
            name = f"{base},{i}"  # a random draw repeated (e.g. a small categorical)
        seen.add(name)
        trials.append(Trial(name=name, params=params))
    return trials


def _given(key: str, args: list[str]) -> bool:
    return any(a.startswith(f"{key}=") for a in args)


def split_config_args(args: list[str]) -> tuple[list[str], list[str]]:
    """`fit` arguments -> (config files, key=value overrides)."""
    files, overrides, it = [], [], iter(args)
    for arg in it:
        if arg in ("-c", "--config"):
            files.append(next(it))
        else:
            overrides.append(arg)
    return files, overrides


def trial_argv(sweep: Sweep, trial: Trial, sweep_dir: Path, extra: list[str], threads: int | None) -> list[str]:
    """The `fit` command line of one trial (what follows `twotower`): the config files (the
    sweep command's, then `extra`'s), then the overrides in the same order, then the trial's
    parameters, name and folder."""
    files, overrides = split_config_args([*sweep.fixed_args, *extra])
    overrides += [*(override(k, v) for k, v in trial.params.items()), f"run.name={trial.name}", f"run.dir={sweep_dir / trial.name}"]
    if not _given("logger.wandb.group", overrides):
        overrides.append(f"logger.wandb.group={sweep.name}")
    if threads and not _given("trainer.num_threads", overrides):
        overrides.append(f"trainer.num_threads={threads}")
    return ["fit", *(x for f in files for x in ("-c", f)), *overrides]


def trial_env(threads: int | None) -> dict[str, str]:
    """The trial's environment: no W&B agent variables (each trial is its own W&B run), and
    `threads` OpenMP/MKL threads so that parallel trials do not oversubscribe the cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def sweep_folder(sweep: Sweep, out: str | Path | None) -> Path:
    return Path(out) if out else Path("runs") / "sweeps" / sweep.name


def run_sweep(file: str | Path, out: str | Path | None = None, extra: list[str] = (), trials: int | None = None,
              parallel: int = 1, seed: int = 0, threads: int | None = None, dry_run: bool = False) -> list[Trial]:
    """Run the sweep's unfinished trials; return every trial with its status."""
    sweep = load_sweep(file)
    if sweep.method == "bayes":
        log.warning(f"sweep {sweep.name}: bayes needs the W&B server; sampling its parameters at random here")
    sweep_dir = sweep_folder(sweep, out)
    parallel = max(1, parallel)
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // parallel)
    todo = make_trials(sweep, trials, seed)
    record_file = sweep_dir / "sweep.json"
    before = {t["name"]: t for t in json.loads(record_file.read_text())["trials"]} if record_file.is_file() else {}
    for trial in todo:  # every trial's config is checked before any trial starts
        trial.argv = argv = trial_argv(sweep, trial, sweep_dir, list(extra), threads)
        try:
            load_config(*split_config_args(argv[1:]))
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.name}: {exc}") from None
        if (sweep_dir / trial.name / "summary.json").is_file():  # finished before: keep its record
            trial.status = "done"
            trial.returncode, trial.wall_s = before.get(trial.name, {}).get("returncode"), before.get(trial.name, {}).get("wall_s")
    if dry_run:
        return todo

    lock = threading.Lock()

    def record() -> None:
        with lock:
            write_json(record_file, {
                "file": str(file), "name": sweep.name, "method": sweep.method,
                "metric": {"name": sweep.metric, "goal": sweep.goal}, "parameters": list(sweep.parameters),
                "fixed_args": sweep.fixed_args, "extra": list(extra), "seed": seed,
                "trials": [{"name": t.name, "params": t.params, "status": t.status, "returncode": t.returncode,
                            "wall_s": t.wall_s} for t in todo]})

    def run(trial: Trial) -> None:
        run_dir = sweep_dir / trial.name
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.status, started = "running", time.time()
        record()
        with open(run_dir / "fit.log", "w") as output:
            done = subprocess.run([sys.executable, "-m", "twotower", *trial.argv], stdout=output,
                                  stderr=subprocess.STDOUT, env=trial_env(threads))
        trial.returncode, trial.wall_s = done.returncode, time.time() - started
        trial.status = "done" if done.returncode == 0 and (run_dir / "summary.json").is_file() else "failed"
        log.info(f"sweep {sweep.name}: {trial.name} {trial.status} ({trial.wall_s:.0f}s)"
                 + (f", see {run_dir / 'fit.log'}" if trial.status == "failed" else ""))
        record()

    pending = [t for t in todo if t.status == "pending"]
    log.info(f"sweep {sweep.name}: {len(todo)} trials, {len(todo) - len(pending)} finished before, "
             f"running {len(pending)} ({parallel} at a time, {threads} threads each) in {sweep_dir}")
    record()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(run, pending))
    return todo


def agent_overrides(environ: Mapping[str, str]) -> list[str]:
    """Under `wandb agent` (which sets WANDB_SWEEP_ID, WANDB_RUN_ID, and WANDB_SWEEP_PARAM_PATH,
    a YAML file of this run's parameters): overrides that `fit` puts before the command line's,
    so that the run is named as the local launcher names it, gets its own folder
    `runs/sweeps/<sweep id>/<name>-<run id>`, and logs to W&B online (the sweep needs the run).
    Explicit `run.name=`/`run.dir=`/`logger.wandb.mode=` on the command line still win."""
    sweep_id, run_id, param_path = (environ.get(k) for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"))
    if not (sweep_id and run_id):
        return []
    params = {}
    if param_path and Path(param_path).is_file():
        loaded = yaml.safe_load(Path(param_path).read_text()) or {}
        params = {k: v.get("value") if isinstance(v, dict) else v for k, v in loaded.items() if k != "wandb_version"}
    name = run_name(params) if params else run_id
    return [f"run.name={name}", f"run.dir=runs/sweeps/{sweep_id}/{name}-{run_id}", "logger.wandb.mode=online"]


def summarise(trials: list[Trial]) -> str:
    counts = {s: sum(t.status == s for t in trials) for s in ("done", "failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)
