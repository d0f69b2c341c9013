"""SQLite item store behind :class:`~metrank.search.Retriever`: id -> modality, file path, text, metadata, vector.

The working database lives in memory, so a process killed half-way through ``add`` never touches the saved copy;
:meth:`ItemStore.save` copies it to a file with SQLite's online backup and :meth:`ItemStore.load` copies a file back
into memory. Metadata is a JSON object per item; filters (``{"key": value}`` or ``{"key": [v1, v2]}``) compile to
``json_extract`` expressions, and every filtered key gets an expression index so lookups stay logarithmic.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metrank.errors import StateError

MODALITIES = ("image", "text", "vector")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
_MAX_VARS = 30000  # below SQLite's default limit of 32766 bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    modality TEXT NOT NULL,
    path TEXT,
    text TEXT,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_modality ON items(modality);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

FilterSpec = Mapping[str, Any]
Where = tuple[str, list[Any]]


@dataclass
class Item:
    """One stored item: what ``Retriever.get`` returns."""

    id: int
    modality: str
    path: str | None
    text: str | None
    metadata: dict[str, Any]
    vector: np.ndarray | None

    def to_dict(self, with_vector: bool = False) -> dict[str, Any]:
        out = {
            "id": self.id,
            "modality": self.modality,
            "path": self.path,
            "text": self.text,
            "metadata": self.metadata,
        }
        if with_vector:
            out["vector"] = self.vector.tolist()
        return out


def _json_path(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise StateError(f"filter key {key!r} is not valid: use letters, digits, '_' or '-' (at most 64 characters)")
    return f"json_extract(metadata, '$.\"{key}\"')"


def _check_filter_value(key: str, value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return int(value) if isinstance(value, bool) else value
    raise StateError(
        f"filter value for {key!r} must be a string, number, bool or a list of those, got {type(value).__name__}"
    )


class ItemStore:
    """Thread-safe in-memory SQLite table of items (one lock serialises all access to the connection)."""

    def __init__(self, dim: int, connection: sqlite3.Connection | None = None) -> None:
        self.dim = int(dim)
        self._db = connection or sqlite3.connect(":memory:", check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._indexed_keys = {
            row[0][len("meta_") :]
            for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='index' AND name LIKE 'meta_%'")
        }

    # ----------------------------------------------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Write a consistent copy of the whole database to ``path`` (a new file; the caller renames it)."""
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()

    @classmethod
    def load(cls, path: str, dim: int) -> ItemStore:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            source.backup(memory)
        finally:
            source.close()
        return cls(dim, memory)

    # ----------------------------------------------------------------------------------------------- writes
    def next_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM items").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def insert(
        self,
        ids: Sequence[int],
        modality: str,
        vectors: np.ndarray,
        metadata_json: Sequence[str],
        paths: Sequence[str | None] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> None:
        """Insert items (metadata as JSON object strings) in one transaction; raises ``ValueError`` (and inserts
        nothing) if an id already exists."""
        if modality not in MODALITIES:
            raise StateError(f"modality must be one of {MODALITIES}, got {modality!r}")
        n = len(ids)
        paths = paths if paths is not None else [None] * n
        texts = texts if texts is not None else [None] * n
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [
            (int(i), modality, p, t, m, vectors[j].tobytes())
            for j, (i, p, t, m) in enumerate(
                zip(ids.tolist() if isinstance(ids, np.ndarray) else ids, paths, texts, metadata_json)
            )
        ]
        with self._lock:
            try:
                with self._db:
                    self._db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                existing = self._existing_locked(ids)
                raise StateError(
                    f"ids already in the index: {sorted(existing)[:10]}; remove them first or pass "
                    f"ids=None to assign new ones"
                ) from None

    def delete(self, ids: Sequence[int]) -> None:
        with self._lock, self._db:
            for chunk in _chunks([int(i) for i in ids]):
                self._db.execute(f"DELETE FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def set_info(self, key: str, value: Any) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, json.dumps(value)))

    def get_info(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # ----------------------------------------------------------------------------------------------- reads
    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def _existing_locked(self, ids: Iterable[int]) -> set:
        found: set = set()
        for chunk in _chunks([int(i) for i in ids]):
            found.update(
                r[0]
                for r in self._db.execute(f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            )
        return found

    def existing(self, ids: Iterable[int]) -> set:
        """The subset of ``ids`` that are stored."""
        with self._lock:
            return self._existing_locked(ids)

    def all_ids(self) -> np.ndarray:
        with self._lock:
            return np.array([r[0] for r in self._db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def get(self, ids: Sequence[int], with_vectors: bool = True) -> dict[int, Item]:
        """Items by id (missing ids are simply absent from the result)."""
        out: dict[int, Item] = {}
        columns = "id, modality, path, text, metadata" + (", vector" if with_vectors else "")
        with self._lock:
            for chunk in _chunks([int(i) for i in ids]):
                for row in self._db.execute(
                    f"SELECT {columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ):
                    vector = np.frombuffer(row[5], dtype=np.float32) if with_vectors else None
                    out[row[0]] = Item(row[0], row[1], row[2], row[3], json.loads(row[4]), vector)
        return out

    def vectors(self, where: Where | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of all items matching ``where`` (all items when None), ordered by id."""
        clause, params = where if where else ("1", [])
        with self._lock:
            rows = self._db.execute(f"SELECT id, vector FROM items WHERE {clause} ORDER BY id", params).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ids, vecs

    def count(self, where: Where | None = None) -> int:
        clause, params = where if where else ("1", [])
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM items WHERE {clause}", params).fetchone()[0])

    def matching(self, ids: np.ndarray, where: Where) -> set:
        """The subset of ``ids`` whose items match ``where``."""
        clause, params = where
        found: set = set()
        with self._lock:
            for chunk in _chunks([int(i) for i in ids]):
                found.update(
                    r[0]
                    for r in self._db.execute(
                        f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))}) AND ({clause})",
                        chunk + params,
                    )
                )
        return found

    def modality_counts(self) -> dict[str, int]:
        with self._lock:
            return {m: int(c) for m, c in self._db.execute("SELECT modality, COUNT(*) FROM items GROUP BY modality")}

    # ----------------------------------------------------------------------------------------------- filters
    def where(self, filter: FilterSpec | None = None, modality: str | None = None) -> Where | None:
        """Compile a metadata filter and a modality restriction to a SQL ``WHERE`` clause (None = everything).

        ``{"key": value}`` matches items whose metadata has exactly that value; ``{"key": [v1, v2]}`` matches any of
        them; several keys are combined with AND. The first use of a key creates an expression index on it.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if modality is not None:
            if modality not in MODALITIES:
                raise StateError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
            clauses.append("modality = ?")
            params.append(modality)
        if filter:
            if not isinstance(filter, Mapping):
                raise StateError(
                    f"filter must be a dict of metadata key -> value or list of values, got {type(filter).__name__}"
                )
            for key, value in filter.items():
                expr = _json_path(key)
                self._ensure_key_index(key, expr)
                if isinstance(value, (list, tuple, set)):
                    values = [_check_filter_value(key, v) for v in value]
                    if not values:
                        raise StateError(f"filter list for {key!r} is empty: it would match nothing")
                    clauses.append(f"{expr} IN ({','.join('?' * len(values))})")
                    params.extend(values)
                else:
                    clauses.append(f"{expr} = ?")
                    params.append(_check_filter_value(key, value))
        return (" AND ".join(clauses), params) if clauses else None

    def _ensure_key_index(self, key: str, expr: str) -> None:
        if key in self._indexed_keys:
            return
        with self._lock, self._db:
            self._db.execute(f'CREATE INDEX IF NOT EXISTS "meta_{key}" ON items({expr})')
        self._indexed_keys.add(key)


def _chunks(values: list[int], size: int = _MAX_VARS) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
