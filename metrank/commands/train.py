"""``metrank train CONFIG [key.sub=value ...] [--resume]``: train from a YAML config (task image_text or metric)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from metrank.training.run import add_arguments

    parser = subparsers.add_parser("train", help="train retrieval heads from a YAML config",
                                   description="Train retrieval heads on cached frozen-backbone features from a YAML "
                                               "config (train/configs/*.yaml); dispatches on the config's task.")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from metrank.training.run import resume_arg, run

    return run(args.config, args.overrides, resume_arg(args))
