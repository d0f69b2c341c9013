"""Where datasets live: ``$METRANK_DATA`` (default ``~/.cache/metrank``)."""

from __future__ import annotations

import os
from pathlib import Path


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$METRANK_DATA``, else ``~/.cache/metrank``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("METRANK_DATA") or Path.home() / ".cache" / "metrank").expanduser()
