"""Embedding shards on disk: Parquet files of (id int64, embedding float32[dim], source string), one per shard.

Every shard is written through ``metrank.atomic`` (a temporary file, then ``os.replace``), so a shard file that
exists is complete: an interrupted job leaves finished shards and no partial ones, and a rerun skips them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metrank.atomic import atomic_path
from metrank.errors import InputError, MissingFileError

SHARD_PATTERN = "shard-{:05d}.parquet"


def write_shard(path: str, ids: np.ndarray, vectors: np.ndarray, sources: Sequence[str]) -> None:
    """Write one shard atomically."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    table = pa.table({"id": pa.array(np.asarray(ids, np.int64)), "embedding": embedding, "source": list(sources)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_shard_ids(path: str) -> np.ndarray:
    """The ids of one shard (the id column only)."""
    return _read_table(path, ["id"]).column("id").to_numpy().astype(np.int64)


def shard_dim(path: str) -> int | None:
    """The embedding width a shard's schema declares (fixed-size lists; ``None`` for variable-length lists, whose
    width :func:`read_shard` checks), read without the data."""
    try:
        column = pq.read_schema(path).field("embedding").type
    except (OSError, KeyError, pa.ArrowInvalid) as err:
        raise InputError(f"cannot read embedding shard {path!r}: {err}") from None
    return column.list_size if pa.types.is_fixed_size_list(column) else None


def check_shard_dims(files: Sequence[str], dim: int | None = None) -> int | None:
    """The common embedding width of the shards (``None``: not declared by any schema); ``InputError`` for a shard
    whose width differs from ``dim`` or from the first one's."""
    for path in files:
        width = shard_dim(path)
        if width is not None and dim is not None and width != dim:
            raise InputError(
                f"{path!r}: embeddings have dimension {width} but the other shards have {dim}; "
                "were the shards made by different models?"
            )
        dim = width if dim is None else dim
    return dim


def read_shard(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(ids, vectors [n, dim] float32, sources)`` of one shard (read-only views of the Parquet data where the types
    match: one copy of a shard in RAM); ``InputError`` when its embeddings are not ``dim`` wide."""
    table = _read_table(path, ["id", "embedding", "source"])
    ids = np.asarray(table.column("id").to_numpy(), np.int64)
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else None
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32)  # float32: Arrow's buffer, no copy
    if width is None:  # variable-length lists: every row must have the same length
        lengths = set(np.diff(column.offsets.to_numpy()).tolist())
        if len(lengths) != 1:
            raise InputError(f"{path!r}: embeddings of different lengths {sorted(lengths)[:5]} in one shard")
        width = lengths.pop()
    if dim is not None and width != dim:
        raise InputError(
            f"{path!r}: embeddings have dimension {width} but the other shards have {dim}; "
            "were the shards made by different models?"
        )
    return ids, flat.reshape(len(ids), width), table.column("source").to_pylist()


def _read_table(path: str, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"cannot read embedding shard {path!r}: {err}") from None


def shard_files(shards: str | Sequence[str]) -> list[str]:
    """The shard files of a folder (``shard-*.parquet``, in order) or the given list."""
    if isinstance(shards, str):
        if not os.path.isdir(shards):
            raise MissingFileError(f"no shard folder at {shards!r}")
        files = sorted(glob.glob(os.path.join(shards, "shard-*.parquet")))
    else:
        files = list(shards)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise MissingFileError(f"{len(missing)} shard files do not exist, e.g. {missing[:3]}")
    if not files:
        raise InputError(f"no embedding shards (shard-*.parquet) in {shards!r}")
    return files


def read_shards(shards: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All shards concatenated in order: ``(ids, vectors, sources)``; ``InputError`` for a shard of another
    dimension or an id that occurs twice."""
    ids, vectors, sources, dim = [], [], [], None
    for path in shard_files(shards):
        shard_ids, shard_vectors, shard_sources = read_shard(path, dim)
        dim = shard_vectors.shape[1]
        ids.append(shard_ids)
        vectors.append(shard_vectors)
        sources.extend(shard_sources)
    all_ids = np.concatenate(ids)
    unique, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"ids occur in more than one row of the shards, e.g. {unique[counts > 1][:5].tolist()}")
    return all_ids, np.concatenate(vectors), sources
