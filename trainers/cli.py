"""The `twotower` command line: one sub-command per job, each taking `-c FILE` (repeatable) and
`key=value` overrides."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from configs import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML config, merged over the defaults in order (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dotlist overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description="Text-aware two-tower recommenders: train, evaluate, serve.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="raw interactions + items -> WebDataset shards + manifest.json")
    _add_config_args(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if the shards are up to date")
    prepare.add_argument("--append", action="store_true",
                         help="add the configured source's interactions (e.g. a later window: data.since=T) to data.dir's; for `update`")
    fit = commands.add_parser("fit", help="train and evaluate (no arguments: the built-in default)")
    _add_config_args(fit)
    evaluate = commands.add_parser("evaluate", help="ranking metrics of a checkpoint on a split")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit`")
    evaluate.add_argument("--split", default="test", choices=["valid", "test", "cold", "valid_window", "test_window"],
                          help="*_window: the users of the window added by `prepare --append`")
    update = commands.add_parser("update", help="continue training a checkpoint on data added by `prepare --append`, re-export")
    _add_config_args(update)
    update.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` or `update` (config: its run folder's config.yaml unless -c)")
    update.add_argument("--out", help="run folder of the update (default: updates/round-N in the checkpoint's run folder)")
    update.add_argument("--export", metavar="DIR", help="re-export the updated model to DIR (a server on DIR swaps to it) if it beat the stale one")
    export = commands.add_parser("export", help="checkpoint -> a folder with the towers, item vectors and a FAISS index")
    _add_config_args(export)
    export.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` (config: its run folder's config.yaml unless -c)")
    export.add_argument("--out", help="output folder (default: export/ in the checkpoint's run folder)")
    recommend = commands.add_parser("recommend", help="top-K items for a history, from an exported model")
    _add_config_args(recommend)
    recommend.add_argument("--model", required=True, help="a folder written by `twotower export`")
    histories = recommend.add_mutually_exclusive_group(required=True)
    histories.add_argument("--history", help="item ids, oldest first, comma-separated: ID,ID,...")
    histories.add_argument("--json", metavar="FILE", help="a JSON list of histories: lists of item ids, or of "
                           '{"item_id", "timestamp", "action"} objects for a model trained with model.user.time_gaps / actions')
    recommend.add_argument("--k", type=int, default=10, help="items per history (default: %(default)s)")
    recommend.add_argument("--skip-unknown", action="store_true", help="drop unknown ids with a warning instead of failing")
    serve = commands.add_parser("serve", help="HTTP JSON server: POST /recommend, POST /items, GET /health")
    _add_config_args(serve)
    serve.add_argument("--model", required=True, help="a folder written by `twotower export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    sweep = commands.add_parser("sweep", help="run a W&B sweep file's trials locally (grid/random, resumable)")
    sweep.add_argument("file", help="a W&B sweep file, e.g. configs/sweep/lr_dim.yaml")
    _add_config_args(sweep)  # -c / key=value: added to every trial's fit command
    sweep.add_argument("--out", help="sweep folder (default: runs/sweeps/<sweep name>)")
    sweep.add_argument("--trials", type=int, help="number of trials (random: required unless the file has run_cap; grid: the first N)")
    sweep.add_argument("--parallel", type=int, default=1, help="trials run at once (default: %(default)s)")
    sweep.add_argument("--threads", type=int, help="torch threads per trial (default: cores / parallel)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random search's draws (default: %(default)s)")
    sweep.add_argument("--dry-run", action="store_true", help="print each trial's command and whether it is finished")
    compare = commands.add_parser("compare", help="table and plots of runs or a sweep folder, best first")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or one sweep folder")
    compare.add_argument("--out", help="output folder (default: the sweep folder, else comparison/)")
    compare.add_argument("--metric", help="rank by this metric (default: the sweep's, else val/ndcg@10)")
    compare.add_argument("--goal", choices=["maximize", "minimize"], help="default: the sweep's, else maximize")
    return parser


def _config_files(args: argparse.Namespace) -> list[str]:
    """export and update read the run's config.yaml unless -c is given; recommend and serve start from the
    exported config.yaml; -c files merge over either."""
    if args.command in ("export", "update") and not args.config:
        run_config = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
        return [str(run_config)] if run_config.is_file() else []
    if args.command in ("recommend", "serve"):
        return [str(Path(args.model) / "config.yaml"), *args.config]
    return args.config


def _sweep_or_compare(args: argparse.Namespace) -> int:
    """Commands that run or read other runs: no config of their own."""
    try:
        if args.command == "sweep":
            from trainers.sweep import main_sweep

            return main_sweep(args)
        from trainers.compare import compare

        compare(args.runs, args.out, args.metric, args.goal)
        return 0
    except ValueError as exc:  # ConfigError included
        print(f"twotower {args.command}: error: {exc}", file=sys.stderr)
        return 2


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("sweep", "compare"):
        return _sweep_or_compare(args)
    if args.command == "fit":
        from trainers.sweep import agent_overrides  # under `wandb agent`: the trial's name and folder

        args.overrides = agent_overrides(os.environ) + args.overrides
    try:
        cfg = load_config(_config_files(args), args.overrides)
    except ConfigError as exc:
        print(f"twotower {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    from datamodules.readers import DataError  # heavy imports only once the config is valid

    try:
        if args.command == "prepare":
            from datamodules.prepare import prepare, prepare_append

            prepare_append(cfg) if args.append else prepare(cfg, force=args.force)
        elif args.command == "fit":
            from trainers.fit import fit

            fit(cfg)
        elif args.command == "evaluate":
            from trainers.evaluate import evaluate_checkpoint

            evaluate_checkpoint(cfg, args.checkpoint, args.split)
        elif args.command == "update":
            from trainers.update import update

            update(cfg, args.checkpoint, args.out, args.export)
        elif args.command == "export":
            from trainers.export import export

            out = args.out or Path(args.checkpoint).resolve().parent.parent / "export"
            export(cfg, args.checkpoint, out, cfg.serving)
        elif args.command == "recommend":
            from trainers.recommend import read_histories, recommend_once

            recommend_once(cfg, args.model, read_histories(args.history, args.json), args.k, args.skip_unknown)
        elif args.command == "serve":
            from trainers.serve import serve

            serve(cfg, args.model, args.host, args.port, cfg.serving)
    except DataError as exc:
        print(f"twotower {args.command}: data error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"twotower {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"twotower {args.command}: training diverged: {exc}", file=sys.stderr)
        return 1
    return 0
