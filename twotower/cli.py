"""The `twotower` command line (also `python -m twotower`): one sub-command per job, each taking
`-c FILE` (repeatable; a path or a packaged group name such as `trainer/ddp`) and `key=value`
overrides. Commands that train need `pip install twotower[train]`; `recommend`, `serve` and
`config show` run on the plain install."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from twotower import __version__
from twotower.configs import ConfigError, load_config
from twotower.streaming.base import StreamError

log = logging.getLogger("twotower")

TRAINING_COMMANDS = ("prepare", "fit", "evaluate", "update", "learn", "export", "sweep", "compare")

# name: (one-line help, description, examples)
COMMANDS = {
    "prepare": ("raw interactions + items -> WebDataset shards + manifest.json",
                "Read interactions and item text, split them leave-one-out by time, tokenise the item text with the "
                "item tower's tokenizer and write WebDataset shards and manifest.json to data.dir (docs/data.md). "
                "`fit` runs it for you when the shards are missing or stale. data.engine=ray runs it as a map-reduce "
                "on Ray (this machine's cores, or a cluster), with the same result.",
                ["twotower prepare                                  # the built-in synthetic data",
                 "twotower prepare -c data/ml100k data.path=../shared/data/ml-100k",
                 "twotower prepare --append data.since=1700000000   # a later window, for `update`",
                 "twotower prepare data.source=table data.interactions=events/ data.items=items.parquet data.engine=ray"]),
    "fit": ("train and evaluate (no arguments: the built-in default)",
            "Train the two towers on data.dir's shards (prepared first if needed; or those at data.shards_url, read as "
            "they are), keep the best checkpoint by "
            "validation NDCG@10, then rank the test split (and cold_valid, cold) over the full catalogue and print the metrics "
            "beside a popularity baseline. Writes a run folder (run.dir): config.yaml, checkpoints/, metrics.csv, "
            "summary.json, curves.png.",
            ["twotower fit                                       # built-in data, MiniLM item tower, a few minutes on CPU",
             "twotower fit model.mode=id trainer.max_epochs=5 run.name=id-baseline",
             "twotower fit -c experiment/ml100k data.path=../shared/data/ml-100k",
             "twotower fit -c trainer/ddp_cpu_2proc              # 2 processes over gloo on one CPU machine"]),
    "evaluate": ("ranking metrics of a checkpoint on a split",
                 "Rank a split over the full catalogue with a checkpoint (HR, NDCG, MRR at eval.ks) beside the "
                 "popularity baseline. Pass the run's config (-c RUN/config.yaml) so that the same data is read.",
                 ["twotower evaluate -c runs/default/config.yaml --checkpoint runs/default/checkpoints/best.ckpt",
                  "twotower evaluate -c runs/default/config.yaml --checkpoint runs/default/checkpoints/best.ckpt --split cold"]),
    "update": ("continue training a checkpoint on data added by `prepare --append`, re-export",
               "Train a checkpoint further on the window that `prepare --append` added, compare it with the stale "
               "model on that window's users, and (with --export) replace the served export only if it improved.",
               ["twotower prepare --append data.since=1700000000",
                "twotower update --checkpoint runs/default/checkpoints/best.ckpt --export runs/default/export"]),
    "learn": ("follow the event stream and keep training a checkpoint on it, re-exporting as it goes",
              "A continuous learner: read the events and items that `serve` (POST /events, POST /items) appends to the "
              "stream (stream.url) from the last committed offset, train on each step's new events (plus a replay "
              "share), add new items to the catalogue, commit weights and offsets together (learn.dir), and publish an "
              "export to --export every learn.export_every_s, which a `serve` on that folder swaps in. Kill it at any "
              "moment: it resumes from its last commit without losing or repeating an event. Under torchrun the "
              "stream is split by user across the processes.",
              ["twotower learn --checkpoint runs/default/checkpoints/best.ckpt --export runs/default/export stream.url=stream/",
               "twotower learn --checkpoint runs/default/checkpoints/best.ckpt stream.url=redis://localhost:6379/0 learn.idle_exit_s=60"]),
    "export": ("checkpoint -> a folder with the towers, item vectors and a FAISS index",
               "Turn a checkpoint (ZeRO ones consolidated) into a self-contained folder that `serve` and `recommend` "
               "load without the training stack: the towers, the item encoder and tokenizer, the item vectors and a "
               "FAISS index.",
               ["twotower export --checkpoint runs/default/checkpoints/best.ckpt   # -> runs/default/export",
                "twotower export --checkpoint runs/default/checkpoints/best.ckpt --out /srv/model serving.hnsw_min_items=1000"]),
    "recommend": ("top-K items for a history, from an exported model",
                  "Print one JSON line per history: the top-K items and their scores.",
                  ["twotower recommend --model runs/default/export --history i00001,i00042 --k 5",
                   "twotower recommend --model runs/default/export --json histories.json"]),
    "serve": ("HTTP JSON server: POST /recommend, POST /items, POST /events, GET /health",
              "Serve an exported model over HTTP. POST /recommend {\"history\": [...], \"k\": 10}; POST /items adds "
              "items from their text without retraining; GET /health. The server follows the export folder and "
              "swaps in a newer export (`update --export`) without a restart. With stream.url, POST /events and "
              "POST /items write to the event stream before they answer, and the server serves every item there.",
              ["twotower serve --model runs/default/export --port 8000",
               "twotower serve --model runs/default/export stream.url=/var/lib/twotower/stream",
               "curl -s localhost:8000/recommend -d '{\"history\": [\"i00001\"], \"k\": 5}'"]),
    "sweep": ("run a W&B sweep file's trials locally (grid/random, resumable)",
              "Run the trials of a W&B sweep file as `twotower fit` runs on this machine (no W&B server needed); "
              "finished trials are skipped when it is run again.",
              ["twotower sweep configs/sweep/lr_dim.yaml --parallel 2 trainer.max_epochs=3",
               "twotower sweep configs/sweep/lr_dim.yaml --dry-run"]),
    "compare": ("table and plots of runs or a sweep folder, best first",
                "Rank runs by a metric and write a table and plots.",
                ["twotower compare runs/sweeps/lr_dim",
                 "twotower compare runs/a runs/b --metric test/ndcg@10"]),
    "config": ("print the resolved config with each key's documentation",
               "`config show` merges the defaults, -c files and key=value overrides exactly as every command does and "
               "prints the result as YAML (loadable with -c), each key under its documentation.",
               ["twotower config show",
                "twotower config show -c trainer/ddp model.dim=128"]),
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                        help="YAML config, merged over the defaults in order (repeatable): a path, or a packaged "
                             "group name such as trainer/ddp (a path that exists wins)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dotlist overrides, applied last")


def _command(commands, name: str, epilog_extra: str = "") -> argparse.ArgumentParser:
    short, description, examples = COMMANDS[name]
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) + epilog_extra
    return commands.add_parser(name, help=short, description=description, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _config_keys_epilog() -> str:
    from twotower.configs.describe import key_lines

    return ("\n\nconfig keys (key=default; `twotower config show` prints them all with their full documentation):\n"
            + "\n".join(key_lines()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Text-aware two-tower recommenders: prepare data, train, evaluate, export, serve.",
        epilog="start here:\n  twotower fit                 # train on the built-in data and print test metrics\n"
               "  twotower fit --help          # every config key\n  twotower config show         # the resolved config, documented\n\n"
               "the data formats and the evaluation protocol: docs/data.md in the repository")
    parser.add_argument("--version", action="version", version=f"twotower {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and results (no progress messages)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prepare = _command(commands, "prepare")
    _add_config_args(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if the shards are up to date")
    prepare.add_argument("--append", action="store_true",
                         help="add the configured source's interactions (e.g. a later window: data.since=T) to data.dir's; for `update`")
    fit = _command(commands, "fit", _config_keys_epilog())
    _add_config_args(fit)
    evaluate = _command(commands, "evaluate")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit`")
    evaluate.add_argument("--split", default="test", choices=["valid", "test", "cold_valid", "cold", "valid_window", "test_window"],
                          help="cold_valid: the held-out items for choosing settings, cold: those for reporting "
                               "(split.cold_item_fraction); *_window: the users of the window added by `prepare --append`")
    update = _command(commands, "update")
    _add_config_args(update)
    update.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` or `update` (config: its run folder's config.yaml unless -c)")
    update.add_argument("--out", help="run folder of the update (default: updates/round-N in the checkpoint's run folder)")
    update.add_argument("--export", metavar="DIR", help="re-export the updated model to DIR (a server on DIR swaps to it) if it beat the stale one")
    learn = _command(commands, "learn")
    _add_config_args(learn)
    learn.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` or `update` (config: its run folder's config.yaml unless -c)")
    learn.add_argument("--export", metavar="DIR", help="publish exports of the learning model to DIR (a server on DIR swaps to each)")
    export = _command(commands, "export")
    _add_config_args(export)
    export.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` (config: its run folder's config.yaml unless -c)")
    export.add_argument("--out", help="output folder (default: export/ in the checkpoint's run folder)")
    recommend = _command(commands, "recommend")
    _add_config_args(recommend)
    recommend.add_argument("--model", required=True, help="a folder written by `twotower export`")
    histories = recommend.add_mutually_exclusive_group(required=True)
    histories.add_argument("--history", help="item ids, oldest first, comma-separated: ID,ID,...")
    histories.add_argument("--json", metavar="FILE", help="a JSON list of histories: lists of item ids, or of "
                           '{"item_id", "timestamp", "action"} objects for a model trained with model.user.time_gaps / actions')
    recommend.add_argument("--k", type=int, default=10, help="items per history (default: %(default)s)")
    recommend.add_argument("--skip-unknown", action="store_true", help="drop unknown ids with a warning instead of failing")
    serve = _command(commands, "serve")
    _add_config_args(serve)
    serve.add_argument("--model", required=True, help="a folder written by `twotower export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    sweep = _command(commands, "sweep")
    sweep.add_argument("file", help="a W&B sweep file, e.g. configs/sweep/lr_dim.yaml")
    _add_config_args(sweep)  # -c / key=value: added to every trial's fit command
    sweep.add_argument("--out", help="sweep folder (default: runs/sweeps/<sweep name>)")
    sweep.add_argument("--trials", type=int, help="number of trials (random: required unless the file has run_cap; grid: the first N)")
    sweep.add_argument("--parallel", type=int, default=1, help="trials run at once (default: %(default)s)")
    sweep.add_argument("--threads", type=int, help="torch threads per trial (default: cores / parallel)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random search's draws (default: %(default)s)")
    sweep.add_argument("--dry-run", action="store_true", help="print each trial's command and whether it is finished")
    compare = _command(commands, "compare")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or one sweep folder")
    compare.add_argument("--out", help="output folder (default: the sweep folder, else comparison/)")
    compare.add_argument("--metric", help="rank by this metric (default: the sweep's, else val/ndcg@10)")
    compare.add_argument("--goal", choices=["maximize", "minimize"], help="default: the sweep's, else maximize")
    config = _command(commands, "config")
    config.add_argument("action", choices=["show"], help="show: print the resolved config")
    _add_config_args(config)
    return parser


def _config_files(args: argparse.Namespace) -> list[str]:
    """export and update read the run's config.yaml unless -c is given; recommend and serve start from the
    exported config.yaml; -c files merge over either."""
    if args.command in ("export", "update", "learn") and not args.config:
        run_config = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
        return [str(run_config)] if run_config.is_file() else []
    if args.command in ("recommend", "serve"):
        return [str(Path(args.model) / "config.yaml"), *args.config]
    return args.config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`build_parser().parse_args`, except that key=value overrides may also follow options
    (`twotower sweep FILE --parallel 2 key=value`): argparse alone fills a positional list once."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


class _Formatter(logging.Formatter):
    """`twotower <module>: message`, with `warning: ` / `error: ` before the message at those levels."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"twotower {record.module}: {level}{record.getMessage()}"


def setup_logging(quiet: bool) -> None:
    """twotower's messages on stderr as `twotower <module>: message`; results go to stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _print_metrics(summary: dict, rows: dict[str, str], ks: list[int], note: str = "") -> None:
    """Print the metrics table of `rows` ({label: key prefix in summary}) on rank 0."""
    from twotower.tables import metrics_table

    present = {label: {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
               for label, prefix in rows.items()}
    if _is_rank_zero():
        print(f"{note}{metrics_table({label: m for label, m in present.items() if m}, ks)}")


def _leave_process_group() -> None:
    """Close a multi-process run's process group (Lightning leaves it open) before the interpreter
    exits, so that no c10d/gloo thread is still running at exit ("terminate called without an
    active exception", seen aborting a rank of a finished two-node SLURM job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args: argparse.Namespace, cfg) -> int:
    if args.command == "prepare":
        from twotower.datamodules.prepare import prepare, prepare_append

        prepare_append(cfg) if args.append else prepare(cfg, force=args.force)
    elif args.command == "fit":
        from twotower.trainers.fit import fit

        summary = fit(cfg)
        _leave_process_group()  # after a clean finish only: a failed run's group may hang on a lost peer
        splits = ("test", "cold_valid", "cold")
        _print_metrics(summary, {label: prefix for s in splits for label, prefix in
                                 ((f"{cfg.model.mode} ({s})", f"{s}/"), (f"popularity ({s})", f"popularity/{s}/"))}, cfg.eval.ks)
    elif args.command == "evaluate":
        from twotower.trainers.evaluate import evaluate_checkpoint

        s = args.split
        summary = evaluate_checkpoint(cfg, args.checkpoint, s)
        _print_metrics(summary, {f"model ({s})": f"{s}/", f"popularity ({s})": f"popularity/{s}/"}, cfg.eval.ks)
    elif args.command == "update":
        from twotower.trainers.update import update

        summary = update(cfg, args.checkpoint, args.out, args.export)
        window = summary["window"]
        _print_metrics(summary, {f"{name} (test_window)": f"{name}/test_window/" for name in ("stale", "updated", "popularity")},
                       cfg.eval.ks, note=f"window from t={window['since']:.0f} (round {window['round']}, "
                                         f"{window['new_users']} users with new events)\n")
    elif args.command == "learn":
        from twotower.trainers.learn import learn

        summary = learn(cfg, args.checkpoint, args.export)
        print(json.dumps({k: summary[k] for k in ("step", "commits", "items_added", "learnt", "skipped")}))
    elif args.command == "export":
        from twotower.trainers.export import export

        export(cfg, args.checkpoint, args.out or Path(args.checkpoint).resolve().parent.parent / "export", cfg.serving)
    elif args.command == "recommend":
        from twotower.serving.recommend import read_histories, recommend_once

        for result in recommend_once(cfg, args.model, read_histories(args.history, args.json), args.k, args.skip_unknown):
            print(json.dumps(result))
    elif args.command == "serve":
        from twotower.serving.app import serve

        serve(cfg, args.model, args.host, args.port, cfg.serving)
    elif args.command == "config":
        from twotower.configs.describe import commented_yaml

        print(commented_yaml(cfg), end="")
    return 0


def _missing_extra(exc: ModuleNotFoundError, command: str) -> int:
    print(f"twotower {command}: needs the training extras ({exc.name} is not installed): pip install 'twotower[train]'",
          file=sys.stderr)
    return 2


TRAINING_MODULES = ("pytorch_lightning", "lightning", "deepspeed", "webdataset", "wandb", "pandas", "pyarrow", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    try:
        if args.command in ("sweep", "compare"):
            return _sweep_or_compare(args)
        if args.command == "fit":
            from twotower.trainers.sweep import agent_overrides  # under `wandb agent`: the trial's name and folder

            args.overrides = agent_overrides(os.environ) + args.overrides
        try:
            cfg = load_config(_config_files(args), args.overrides)
        except ConfigError as exc:
            print(f"twotower {args.command}: config error: {exc}", file=sys.stderr)
            return 2
        return _run(args, cfg)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in TRAINING_MODULES and args.command in TRAINING_COMMANDS:
            return _missing_extra(exc, args.command)
        raise
    except ValueError as exc:  # DataError and ConfigError included
        print(f"twotower {args.command}: {_error_kind(exc, args.command)}: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"twotower {args.command}: training diverged: {exc}", file=sys.stderr)
        return 1
    except StreamError as exc:  # stream.url cannot be opened, read or written
        print(f"twotower {args.command}: stream error: {exc}", file=sys.stderr)
        return 1


def _error_kind(exc: ValueError, command: str) -> str:
    """"data error" for bad input data (only the training commands read any), else "error"."""
    if command in TRAINING_COMMANDS:
        from twotower.datamodules.readers import DataError

        if isinstance(exc, DataError):
            return "data error"
    return "error"


def _sweep_or_compare(args: argparse.Namespace) -> int:
    """Commands that run or read other runs: no config of their own."""
    if args.command == "sweep":
        from twotower.trainers.sweep import load_sweep, run_sweep, summarise, sweep_folder

        extra = [x for f in args.config for x in ("-c", f)] + list(args.overrides)
        trials = run_sweep(args.file, args.out, extra, args.trials, args.parallel, args.seed, args.threads, args.dry_run)
        if args.dry_run:
            print("\n".join(f"[{t.status}] twotower " + " ".join(t.argv) for t in trials))
        else:
            print(f"sweep: {summarise(trials)}; compare with: twotower compare {sweep_folder(load_sweep(args.file), args.out)}")
        return 1 if any(t.status == "failed" for t in trials) else 0
    from twotower.trainers.compare import compare

    print(compare(args.runs, args.out, args.metric, args.goal)[1])
    return 0
