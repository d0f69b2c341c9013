"""Safe file I/O: every checkpoint, index, cache and result file is written through :func:`atomic_path`, and every
torch file is read through :func:`load_torch_file`.

A reader (or a crash) sees either the old file or the complete new one, never a partial write: the data goes to a
temporary file in the same folder, is flushed to disk, and then ``os.replace``-d over the target. Torch files load
with ``weights_only=True`` only (tensors, numbers, strings, lists, dicts): a file that would need unpickling of
arbitrary objects is refused with a :class:`metrank.errors.StateError`, never executed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch

from metrank.errors import MissingFileError, StateError

PathLike = Union[str, "os.PathLike[str]"]


def _umask_mode() -> int:
    """Permissions a plainly created file would get (``mkstemp`` makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is fsync-ed and renamed onto ``path``, on error removed.

    >>> with atomic_path("index.faiss") as tmp:
    ...     faiss.write_index(index, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch_file(path: PathLike, what: str = "file", map_location: str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, damaged or unsafe file raises a ``MetrankError`` naming
    ``what`` it should have been."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise StateError(
            f"{what} {path!r} holds objects other than tensors, numbers, strings, lists and dicts, so it was not "
            f"loaded (metrank never unpickles arbitrary objects; re-save it with plain tensors): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise StateError(
            f"{what} {path!r} is damaged or not a torch file ({type(err).__name__}: {err}); write it again"
        ) from None
