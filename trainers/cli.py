"""The `twotower` command line: one sub-command per job, each taking `-c FILE` (repeatable) and
`key=value` overrides."""
from __future__ import annotations

import argparse
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
    fit = commands.add_parser("fit", help="train and evaluate (no arguments: the built-in default)")
    _add_config_args(fit)
    evaluate = commands.add_parser("evaluate", help="ranking metrics of a checkpoint on a split")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit`")
    evaluate.add_argument("--split", default="test", choices=["valid", "test", "cold"])
    export = commands.add_parser("export", help="checkpoint -> a folder with the towers, item vectors and a FAISS index")
    _add_config_args(export)
    export.add_argument("--checkpoint", required=True, help="a .ckpt written by `twotower fit` (config: its run folder's config.yaml unless -c)")
    export.add_argument("--out", help="output folder (default: export/ in the checkpoint's run folder)")
    recommend = commands.add_parser("recommend", help="top-K items for a history, from an exported model")
    _add_config_args(recommend)
    recommend.add_argument("--model", required=True, help="a folder written by `twotower export`")
    histories = recommend.add_mutually_exclusive_group(required=True)
    histories.add_argument("--history", help="item ids, oldest first, comma-separated: ID,ID,...")
    histories.add_argument("--json", metavar="FILE", help="a JSON list of histories (lists of item ids)")
    recommend.add_argument("--k", type=int, default=10, help="items per history (default: %(default)s)")
    recommend.add_argument("--skip-unknown", action="store_true", help="drop unknown ids with a warning instead of failing")
    serve = commands.add_parser("serve", help="HTTP JSON server: POST /recommend, POST /items, GET /health")
    _add_config_args(serve)
    serve.add_argument("--model", required=True, help="a folder written by `twotower export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    return parser


def _config_files(args: argparse.Namespace) -> list[str]:
    """export reads the run's config.yaml unless -c is given; recommend and serve start from the
    exported config.yaml; -c files merge over either."""
    if args.command == "export" and not args.config:
        run_config = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
        return [str(run_config)] if run_config.is_file() else []
    if args.command in ("recommend", "serve"):
        return [str(Path(args.model) / "config.yaml"), *args.config]
    return args.config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(_config_files(args), args.overrides)
    except ConfigError as exc:
        print(f"twotower {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    from datamodules.readers import DataError  # heavy imports only once the config is valid

    try:
        if args.command == "prepare":
            from datamodules.prepare import prepare

            prepare(cfg, force=args.force)
        elif args.command == "fit":
            from trainers.fit import fit

            fit(cfg)
        elif args.command == "evaluate":
            from trainers.evaluate import evaluate_checkpoint

            evaluate_checkpoint(cfg, args.checkpoint, args.split)
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
    return 0
