"""The ``metrank`` command: each subcommand lives in ``metrank.commands.<module>`` and registers itself.

A command module exposes ``register(subparsers)``, which adds one or more subparsers and sets ``func`` (called with
the parsed ``argparse.Namespace``; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from metrank.errors import MetrankError

COMMAND_MODULES = (
    "metrank.commands.evaluate",  # metrank evaluate
    "metrank.commands.data",  # metrank data fetch|list
    "metrank.commands.train",  # metrank train
    "metrank.commands.search",  # metrank embed|index|search|serve
    "metrank.commands.scale",  # metrank scale index|evaluate (Ray)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metrank", description="Metric learning and cross-modal retrieval.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MetrankError as err:
        print(f"metrank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
