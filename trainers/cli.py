"""The `twotower` command line: one sub-command per job, each taking `-c FILE` (repeatable) and
`key=value` overrides."""
from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
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
    except DataError as exc:
        print(f"twotower {args.command}: data error: {exc}", file=sys.stderr)
        return 2
    return 0
