"""Item lists for ``metrank embed`` / ``metrank index``: image folders, CSV, JSONL and plain-text files.

- a folder: every image file below it (``.png .jpg .jpeg .gif .webp .bmp``), metadata ``{"file": relative path,
  "folder": parent folder name}``;
- ``.csv`` / ``.jsonl``: one item per row; the image path comes from column ``image``/``path``/``file`` (relative
  paths are relative to the file), the text from ``text``/``caption``/``name``; every other column becomes metadata
  (CSV cells that parse as numbers become numbers, so ``--filter year=2020`` matches);
- ``.txt``: one text per non-empty line.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any

from metrank.errors import InputError, MissingFileError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "path", "file")
TEXT_COLUMNS = ("text", "caption", "name")


@dataclass
class Items:
    """Parallel lists: ``images`` (paths) or ``texts``, plus one metadata dict per item."""

    images: list[str] | None = None
    texts: list[str] | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metadata)


def parse_scalar(value: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def read_items(source: str, kind: str) -> Items:
    """Read ``kind`` ("image" or "text") items from ``source`` (see the module docstring)."""
    if kind not in ("image", "text"):
        raise InputError(f"kind must be 'image' or 'text', got {kind!r}")
    if not os.path.exists(source):
        raise MissingFileError(f"{source!r} does not exist")
    if os.path.isdir(source):
        if kind != "image":
            raise InputError(f"{source!r} is a folder: folders hold images; give texts as .txt/.csv/.jsonl")
        return _read_folder(source)
    suffix = os.path.splitext(source)[1].lower()
    if suffix == ".txt":
        if kind != "text":
            raise InputError(f"{source!r}: .txt files hold texts (one per line), not image paths")
        with open(source, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        return Items(texts=texts, metadata=[{} for _ in texts])
    if suffix == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            rows = [
                {k: parse_scalar(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(f)
            ]
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(source, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise InputError(f"{source}:{number} is not valid JSON: {err}") from None
                    if not isinstance(row, dict):
                        raise InputError(f"{source}:{number} must be a JSON object")
                    rows.append(row)
    else:
        raise InputError(f"unsupported item list {source!r}: use a folder, .csv, .jsonl or .txt")
    return _from_rows(rows, kind, os.path.dirname(os.path.abspath(source)), source)


def _read_folder(folder: str) -> Items:
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    metadata = [{"file": os.path.relpath(p, folder), "folder": os.path.basename(os.path.dirname(p))} for p in paths]
    return Items(images=paths, metadata=metadata)


def _from_rows(rows: list[dict[str, Any]], kind: str, base: str, source: str) -> Items:
    if not rows:
        raise InputError(f"{source!r} has no rows")
    columns = IMAGE_COLUMNS if kind == "image" else TEXT_COLUMNS
    column = next((c for c in columns if c in rows[0]), None)
    if column is None:
        raise InputError(f"{source!r} needs a column named one of {columns} for {kind}s; it has {sorted(rows[0])}")
    values, metadata = [], []
    for number, row in enumerate(rows, 1):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{source!r} row {number}: column {column!r} is empty")
        values.append(os.path.join(base, value) if kind == "image" else value)
        metadata.append({k: v for k, v in row.items() if k != column})
    return Items(images=values, metadata=metadata) if kind == "image" else Items(texts=values, metadata=metadata)
