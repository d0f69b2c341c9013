"""SQLite item store behind :class:`~metrank.search.Retriever`: id -> modality, file path, text, metadata, vector.

The store is the retriever's source of truth. An unsaved retriever keeps it in memory; a saved one works on
``<directory>/items.sqlite`` in WAL mode with ``synchronous=FULL``, so a committed transaction survives a process
kill and a power loss. Every write happens inside :meth:`ItemStore.transaction`; with ``autocommit`` it is committed
before the call returns (the Retriever's durability guarantee), otherwise it stays open until :meth:`commit`.

Every row carries ``seq``, the number of the write that inserted it; an index snapshot records the last ``seq`` it
contains, so loading replays exactly the rows added after it (:mod:`metrank.search.snapshot`).

Metadata is a JSON object per item; filters (``{"key": value}`` or ``{"key": [v1, v2]}``) compile to
``json_extract`` expressions. Reads never write: expression indexes for metadata keys are created on the write
path, for the first :data:`MAX_INDEXED_KEYS` keys that added metadata uses (other keys are filtered by a scan).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from metrank.errors import InputError, StateError

MODALITIES = ("image", "text", "vector")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_INDEXED_KEYS = 16
MAX_METADATA_DEPTH = 32
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
_MAX_VARS = 30000  # below SQLite's default limit of 32766 bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    modality TEXT NOT NULL,
    path TEXT,
    text TEXT,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_modality ON items(modality);
CREATE INDEX IF NOT EXISTS items_seq ON items(seq);
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
    vector: np.ndarray | None = None

    def to_dict(self, with_path: bool = False, with_vector: bool = False) -> dict[str, Any]:
        """The one JSON form of items and hits (HTTP answers, ``metrank search --json``): every field but ``path``
        (a server path; ``has_image`` says whether there is one) and ``vector``, unless asked for."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "path":
                out["has_image"] = value is not None
                if with_path:
                    out["path"] = value
            elif f.name == "vector":
                if with_vector and value is not None:
                    out["vector"] = value.tolist()
            else:
                out[f.name] = value
        return out


def check_int64(value: Any, what: str) -> int:
    """``value`` as a Python int if it is an integer SQLite can store (64-bit signed), else ``InputError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InputError(f"{what} {value} does not fit in a 64-bit signed integer")
    return value


def metadata_json(metadata: Mapping[str, Any], what: str) -> str:
    """Strict JSON text of one metadata dict: no NaN/Infinity (JSON has none), integers within 64 bits (what
    SQLite's JSON functions read exactly), at most :data:`MAX_METADATA_DEPTH` levels of nesting."""

    def check(value: Any, depth: int) -> None:
        if depth > MAX_METADATA_DEPTH:
            raise InputError(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{what} holds {value}: metadata numbers must be finite (JSON has no NaN/Infinity)")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            raise InputError(f"{what} holds {value}, which does not fit in a 64-bit signed integer")
        if isinstance(value, Mapping):
            for item in value.values():
                check(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                check(item, depth + 1)

    if not isinstance(metadata, Mapping):
        raise InputError(f"{what} must be a dict, got {type(metadata).__name__}")
    check(metadata, 0)
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} is not JSON-serialisable: {err}") from None


def _json_path(key: Any) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise InputError(f"filter key {key!r} is not valid: use letters, digits, '_' or '-' (at most 64 characters)")
    return f"json_extract(metadata, '$.\"{key}\"')"


def _check_filter_value(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return check_int64(value, f"filter value for {key!r}:")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"filter value for {key!r} must be finite, got {value}")
        return value
    if value is None or isinstance(value, str):
        return value
    raise InputError(
        f"filter value for {key!r} must be a string, number, bool or a list of those, got {type(value).__name__}"
    )


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    if path != ":memory:":
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StateError(f"{path}: SQLite could not switch to WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous=FULL")
    return db


class ItemStore:
    """Thread-safe SQLite table of items (one lock serialises all access to the connection).

    ``path``: None for an in-memory store, else the database file (created if missing). ``autocommit``: commit every
    :meth:`transaction` before it returns (durable writes); False keeps one transaction open until :meth:`commit`.
    """

    def __init__(self, dim: int, path: str | None = None, autocommit: bool = True) -> None:
        self.dim = int(dim)
        self.path = path
        self.autocommit = autocommit
        self._lock = threading.RLock()
        self._db = _connect(path or ":memory:")
        try:
            self._db.executescript(_SCHEMA)
            self._indexed_keys = {
                row[0][len("meta_") :]
                for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='index' AND name LIKE 'meta_%'")
            }
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._db.in_transaction:
                self._db.commit()
            self._db.close()

    # ----------------------------------------------------------------------------------------------- persistence
    def copy_to(self, path: str, autocommit: bool = True) -> ItemStore:
        """Write a consistent copy of the whole database to the file ``path`` and return a store working on it."""
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()
        return ItemStore(self.dim, path, autocommit=autocommit)

    def check(self) -> None:
        """Raise ``sqlite3.DatabaseError`` if the file is damaged (SQLite's quick integrity check)."""
        with self._lock:
            result = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise sqlite3.DatabaseError(result)

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file (keeps the WAL small; called after index snapshots)."""
        if self.path is not None:
            with self._lock:
                if not self._db.in_transaction:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ----------------------------------------------------------------------------------------------- writes
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: all of them or none (rolled back on error). Committed at the end with ``autocommit``."""
        with self._lock:
            if not self._db.in_transaction:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.rollback()
                raise
            if self.autocommit:
                self._db.commit()

    def commit(self) -> None:
        with self._lock:
            if self._db.in_transaction:
                self._db.commit()

    def next_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM items").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def insert(
        self,
        ids: np.ndarray,
        modality: str,
        vectors: np.ndarray,
        metadata: Sequence[str],
        paths: Sequence[str | None] | None = None,
        texts: Sequence[str | None] | None = None,
        seq: int = 0,
    ) -> None:
        """Insert items (metadata as JSON object strings); call inside :meth:`transaction`. ``StateError`` if an id
        already exists (the transaction then adds nothing)."""
        if modality not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        n = len(ids)
        paths = paths if paths is not None else [None] * n
        texts = texts if texts is not None else [None] * n
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [
            (int(i), modality, p, t, m, vectors[j].tobytes(), int(seq))
            for j, (i, p, t, m) in enumerate(zip(ids.tolist(), paths, texts, metadata))
        ]
        with self._lock:
            try:
                self._db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                existing = self._existing_locked(ids)
                raise StateError(
                    f"ids already in the index: {sorted(existing)[:10]}; remove them first or pass "
                    f"ids=None to assign new ones"
                ) from None
            keys = {key for m in metadata for key in json.loads(m)}
            for key in sorted(keys - self._indexed_keys):
                if len(self._indexed_keys) >= MAX_INDEXED_KEYS or not isinstance(key, str) or not _KEY.match(key):
                    continue
                self._db.execute(f'CREATE INDEX IF NOT EXISTS "meta_{key}" ON items({_json_path(key)})')
                self._indexed_keys.add(key)

    def delete(self, ids: Sequence[int] | np.ndarray) -> None:
        """Delete items by id; call inside :meth:`transaction`."""
        with self._lock:
            for chunk in _chunks([int(i) for i in ids]):
                self._db.execute(f"DELETE FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def set_info(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, json.dumps(value)))

    def get_info(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # ----------------------------------------------------------------------------------------------- reads
    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def total_changes(self) -> int:
        """Rows changed through this connection so far (a read never changes it)."""
        with self._lock:
            return self._db.total_changes

    def schema_objects(self) -> list[str]:
        """Names of the tables and indexes in the database."""
        with self._lock:
            return sorted(r[0] for r in self._db.execute("SELECT name FROM sqlite_master"))

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
        return self._id_vectors(f"SELECT id, vector FROM items WHERE {clause} ORDER BY id", params)

    def added_since(self, seq: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per modality, ``(ids, vectors)`` of the rows inserted by writes numbered after ``seq``."""
        with self._lock:
            modalities = [r[0] for r in self._db.execute("SELECT DISTINCT modality FROM items WHERE seq > ?", (seq,))]
        return {
            m: self._id_vectors("SELECT id, vector FROM items WHERE seq > ? AND modality = ? ORDER BY id", [seq, m])
            for m in modalities
        }

    def _id_vectors(self, sql: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
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
    @staticmethod
    def where(filter: FilterSpec | None = None, modality: str | None = None) -> Where | None:
        """Compile a metadata filter and a modality restriction to a SQL ``WHERE`` clause (None = everything).

        ``{"key": value}`` matches items whose metadata has exactly that value; ``{"key": [v1, v2]}`` matches any of
        them; several keys are combined with AND. Pure: compiling never touches the database.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if modality is not None:
            if modality not in MODALITIES:
                raise InputError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
            clauses.append("modality = ?")
            params.append(modality)
        if filter:
            if not isinstance(filter, Mapping):
                raise InputError(
                    f"filter must be a dict of metadata key -> value or list of values, got {type(filter).__name__}"
                )
            for key, value in filter.items():
                expr = _json_path(key)
                if isinstance(value, (list, tuple, set)):
                    values = [_check_filter_value(key, v) for v in value]
                    if not values:
                        raise InputError(f"filter list for {key!r} is empty: it would match nothing")
                    clauses.append(f"{expr} IN ({','.join('?' * len(values))})")
                    params.extend(values)
                else:
                    clauses.append(f"{expr} = ?")
                    params.append(_check_filter_value(key, value))
        return (" AND ".join(clauses), params) if clauses else None


def _chunks(values: list[int], size: int = _MAX_VARS) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
