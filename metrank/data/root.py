"""Where datasets live: ``$METRANK_DATA`` (default ``~/.cache/metrank``), and the check that a dataset is there."""

from __future__ import annotations

import os
from pathlib import Path

from metrank.errors import MissingFileError


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$METRANK_DATA``, else ``~/.cache/metrank``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("METRANK_DATA") or Path.home() / ".cache" / "metrank").expanduser()


def require_root(name: str, root: str | None) -> str:
    """``root`` (default ``$METRANK_DATA/<name>``), or a ``MissingFileError`` saying how to get the data."""
    path = root or str(data_root() / name)
    if not os.path.isdir(path):
        raise MissingFileError(
            f"{name} not found at {path!r}; `metrank data fetch {name}` prints where to "
            "download it and which layout to unpack there"
        )
    return path
