"""Read and write embedding / label arrays as ``.npy``, ``.npz`` or ``.pt`` files.

A source is a path, optionally followed by ``:key`` to pick one array out of a ``.npz`` archive or a ``.pt`` dict
(``embeddings.npz:images``). ``.pt`` files are read with ``torch.load(..., weights_only=True)`` (tensors, dicts and
lists of tensors only; never arbitrary pickles), ``.npy``/``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from metrank.atomic import atomic_path, load_torch_file
from metrank.errors import InputError, MissingFileError
from metrank.validation import check_embeddings, check_labels

SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def split_source(source: str) -> tuple[str, str | None]:
    """``"file.npz:key"`` -> ``("file.npz", "key")``; a plain existing path -> ``(path, None)``."""
    if os.path.exists(source) or ":" not in source:
        return source, None
    path, key = source.rsplit(":", 1)
    return path, key or None


def _pick(container: dict, key: str | None, path: str) -> object:
    if key is None:
        if len(container) != 1:
            raise InputError(
                f"{path} holds several arrays ({', '.join(map(str, container))}); choose one with {path}:KEY"
            )
        return next(iter(container.values()))
    if key not in container:
        raise InputError(f"{path} has no array {key!r}; it holds: {', '.join(map(str, container))}")
    return container[key]


def load_array(source: str, key: str | None = None) -> np.ndarray:
    """Load one array from ``source`` (``path`` or ``path:key``, see the module docstring)."""
    path, source_key = split_source(source)
    key = key if key is not None else source_key
    if not os.path.isfile(path):
        raise MissingFileError(f"no such file: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        if key is not None:
            raise InputError(f"{path} is a single .npy array; drop the ':{key}' key")
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return np.asarray(_pick({name: archive[name] for name in archive.files}, key, path))
    if suffix in (".pt", ".pth"):
        obj = load_torch_file(path, "embeddings file")
        if isinstance(obj, dict):
            obj = _pick(obj, key, path)
        elif key is not None:
            raise InputError(f"{path} holds a single {type(obj).__name__}, not a dict; drop the ':{key}' key")
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().numpy()
        return np.asarray(obj)
    raise InputError(f"unsupported file type {suffix!r} for {path!r}; use one of {', '.join(SUFFIXES)}")


def load_embeddings(source: str, key: str | None = None, dim: int | None = None) -> np.ndarray:
    """A checked float32 [n, dim] embedding matrix (float64/float16 are converted)."""
    x = load_array(source, key)
    check_embeddings(x, f"embeddings in {source}", dim)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_labels(source: str, n: int, key: str | None = None) -> np.ndarray:
    """A checked int64 label (or id) vector that must have one entry per embedding (``n``)."""
    labels = load_array(source, key)
    check_labels(labels, n, f"labels in {source}")
    return labels.astype(np.int64, copy=False)


def save_arrays(path: str, **arrays: np.ndarray) -> None:
    """Write named arrays to a ``.npz`` file atomically (temporary file in the same folder, then ``os.replace``)."""
    if not path.endswith(".npz"):
        raise InputError(f"save_arrays writes .npz archives; got {path!r}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        named = {name: np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for name, a in arrays.items()}
        np.savez(f, **named)  # type: ignore[arg-type]
