"""What a retriever folder holds and how it is read back: manifest, index snapshots, model reference, replay.

Layout of a saved retriever ``DIR/``::

    items.sqlite (+ -wal, -shm)   the live item store (WAL, synchronous=FULL): every acknowledged write is here
    MANIFEST.json                 {"format": 2, "version": 7, "snapshot": "v000007"}, replaced atomically
    v000007/index.faiss           the FAISS index as of write number ``seq`` (config.json), plus hubness state
    v000007/config.json           dim, index spec, model reference, seq, index ids hash, file checksums
    model.pt                      the model, for retrievers created from a model object or name

A snapshot folder is written under a temporary name, fsync-ed, renamed, and only then does ``MANIFEST.json`` switch
to it; a process killed at any moment leaves the previous snapshot intact. Loading opens the snapshot the manifest
names, checks its checksums, and replays the store's rows written after the snapshot (:func:`replay_plan`); ids
removed since are dropped from the index. One process writes a folder at a time (``metrank serve`` or a script). Damage is reported as a :class:`~metrank.errors.StateError` naming the
file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from metrank.atomic import atomic_path, atomic_write_text
from metrank.encoders import create_model, load_checkpoint, save_checkpoint
from metrank.errors import InputError, MissingFileError, StateError
from metrank.index import Index
from metrank.search.hubness import HubnessState
from metrank.search.store import ItemStore

MANIFEST = "MANIFEST.json"
DB_FILE = "items.sqlite"
FORMAT_VERSION = 2
SNAPSHOT_NAME = re.compile(r"^v(\d{6,})$")
_REBUILD = "rebuild the retriever with `metrank index` (or restore the folder from a backup)"
_CONFIG_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "dim": int,
    "index_spec": str,
    "model": dict,
    "seq": int,
    "items": int,
    "ids_sha256": str,
    "files": dict,
}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _damaged(path: str, reason: str) -> StateError:
    return StateError(f"{path} is damaged ({reason}); {_REBUILD}")


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest of ``directory`` (None if there is none), checked: a JSON object naming a snapshot folder."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, f"not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"a JSON {type(manifest).__name__} instead of an object")
    snapshot, version = manifest.get("snapshot"), manifest.get("version")
    if not isinstance(snapshot, str) or not SNAPSHOT_NAME.match(snapshot):
        raise _damaged(path, f"'snapshot' must name a folder like v000001, got {snapshot!r}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, f"'version' must be an integer, got {version!r}")
    return manifest


def next_snapshot_number(directory: str) -> int:
    manifest = read_manifest(directory) or {"version": 0}
    names = [int(m.group(1)) for m in map(SNAPSHOT_NAME.match, os.listdir(directory)) if m]
    return 1 + max([manifest["version"], *names])


# ------------------------------------------------------------------------------------------------ writing
def write_snapshot(directory: str, index: Index, hubness: HubnessState | None, config: Mapping[str, Any]) -> str:
    """Write ``index`` (+ hubness state) as a new snapshot folder, switch the manifest to it, delete older ones.
    ``config`` gets ``format``, ``items``, ``ids_sha256`` and ``files`` added. Returns the snapshot's name."""
    number = next_snapshot_number(directory)
    name = f"v{number:06d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        index.save(os.path.join(tmp, "index.faiss"))
        if hubness is not None:
            hubness.save(tmp)
        ids = index.stored_ids()
        files = sorted(os.listdir(tmp))
        full = {
            "format": FORMAT_VERSION,
            **config,
            "items": int(len(ids)),
            "ids_sha256": ids_digest(ids),
            "files": {f: sha256_file(os.path.join(tmp, f)) for f in files},
        }
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(full, indent=1))
        for f in files:
            with open(os.path.join(tmp, f), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, os.path.join(directory, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {"format": FORMAT_VERSION, "version": number, "snapshot": name}
    atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest))
    _fsync_dir(directory)
    for entry in os.listdir(directory):  # older snapshots and leftovers of killed saves
        if entry != name and (SNAPSHOT_NAME.match(entry) or (entry.startswith(".v") and entry.endswith(".tmp"))):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    return name


# ------------------------------------------------------------------------------------------------ reading
def read_snapshot(directory: str, device: str = "auto") -> tuple[dict[str, Any], Index, HubnessState | None]:
    """``(config, index, hubness)`` of the snapshot the manifest names, every file checked."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise MissingFileError(f"no retriever saved in {directory!r} (missing {MANIFEST})")
    snapshot = os.path.join(directory, manifest["snapshot"])
    config_path = os.path.join(snapshot, "config.json")
    if not os.path.isfile(config_path):
        raise _damaged(config_path, f"missing, though {MANIFEST} names snapshot {manifest['snapshot']}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(config_path, f"not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise _damaged(config_path, "not a JSON object")
    if config.get("format") != FORMAT_VERSION:
        raise StateError(
            f"{config_path} has format {config.get('format')!r}, this metrank reads {FORMAT_VERSION}: "
            "rebuild the retriever with `metrank index`"
        )
    for key, kind in _CONFIG_TYPES.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise _damaged(config_path, f"{key!r} must be a {getattr(kind, '__name__', kind)}, got {config.get(key)!r}")
    for name, digest in config["files"].items():
        path = os.path.join(snapshot, name)
        if not isinstance(name, str) or os.sep in name or not os.path.isfile(path):
            raise _damaged(path, "missing")
        if sha256_file(path) != digest:
            raise _damaged(path, "checksum mismatch")
    index_path = os.path.join(snapshot, "index.faiss")
    try:
        index = Index.load(index_path, device=device)
    except (RuntimeError, MemoryError) as err:
        raise _damaged(index_path, f"FAISS cannot read it: {str(err).splitlines()[-1][:200]}") from None
    if index.dim != config["dim"] or ids_digest(index.stored_ids()) != config["ids_sha256"]:
        raise _damaged(index_path, "its dimension or ids differ from config.json")
    try:
        hubness = HubnessState.load(snapshot)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise _damaged(os.path.join(snapshot, "hubness.npz"), str(err)) from None
    return config, index, hubness


def open_store(directory: str, dim: int, autocommit: bool) -> ItemStore:
    """The live item store of a saved retriever, checked with SQLite's integrity check."""
    path = os.path.join(directory, DB_FILE)
    if not os.path.isfile(path):
        raise _damaged(path, "missing")
    try:
        store = ItemStore(dim, path, autocommit=autocommit)
        store.check()
        store.get_info("seq")
    except sqlite3.DatabaseError as err:
        raise _damaged(path, f"SQLite: {err}") from None
    return store


def replay_plan(store: ItemStore, index_ids: np.ndarray, seq: int) -> tuple[np.ndarray, dict]:
    """What brings an index snapshot taken at write ``seq`` up to date with ``store``: ``(ids to drop from the
    index, {modality: (ids, vectors) to add})``. Dropped: ids no longer stored, and ids re-added after the
    snapshot (their vectors may have changed). Added: rows written after the snapshot, and any other stored row the
    index lacks (written by a second process on the same folder, which is not supported but is recovered here)."""
    added = store.added_since(seq)
    readded = np.concatenate([ids for ids, _ in added.values()] or [np.empty(0, np.int64)])
    stored = store.all_ids()
    drop = np.union1d(np.setdiff1d(index_ids, stored), np.intersect1d(index_ids, readded))
    missing = np.setdiff1d(np.setdiff1d(stored, index_ids), readded)
    if missing.size:
        items = store.get(missing.tolist())
        for modality in {item.modality for item in items.values()}:
            ids = np.array(sorted(i for i, item in items.items() if item.modality == modality), dtype=np.int64)
            vectors = np.stack([np.asarray(items[int(i)].vector) for i in ids])
            if modality in added:
                ids, vectors = np.concatenate([added[modality][0], ids]), np.concatenate([added[modality][1], vectors])
            added[modality] = (ids, vectors)
    return drop, added


# ------------------------------------------------------------------------------------------------ the model
def resolve_model(model: Any) -> tuple[Any, dict[str, Any]]:
    """``(model object, reference)``; the reference says how loading rebuilds exactly this model: from the user's
    checkpoint file (path + SHA-256, checked on load) or from ``model.pt`` saved in the retriever folder (for model
    objects and names - a named model's projection heads may be freshly initialised, so the name alone would not
    reproduce the indexed embeddings)."""
    if model is None:
        return None, {}
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if os.path.isfile(model):
            path = os.path.abspath(model)
            return load_model_file(path), {"checkpoint": path, "sha256": sha256_file(path)}
        if model.endswith((".pt", ".pth", ".ckpt")) or os.sep in model.replace("timm/", "").replace("open_clip/", ""):
            raise MissingFileError(f"checkpoint {model!r} not found")

        return create_model(model), {"embedded": "model.pt", "name": model}
    if hasattr(model, "embed_images") and hasattr(model, "embed_dim"):
        return model, {"embedded": "model.pt", "name": getattr(model, "config", {}).get("name")}
    raise InputError(f"model must be a RetrievalModel, a checkpoint path or a model name, got {type(model).__name__}")


def load_model_file(path: str):
    """``metrank.encoders.load_checkpoint`` with refusals of unsafe or damaged files as ``StateError``."""

    try:
        return load_checkpoint(path)
    except pickle.UnpicklingError:
        raise StateError(
            f"checkpoint {path} is refused: it holds Python objects other than tensors, numbers, strings, lists "
            "and dicts, which could run code when loaded; use a checkpoint written by metrank "
            "(metrank.encoders.save_checkpoint)"
        ) from None
    except (RuntimeError, EOFError, KeyError) as err:
        raise StateError(f"checkpoint {path} is damaged or not a metrank checkpoint ({type(err).__name__})") from None


def build_model(reference: Mapping[str, Any], directory: str | None):
    """Rebuild the model a retriever's ``reference`` (see :func:`resolve_model`) points to."""
    if not reference:
        raise InputError(
            "this retriever has no model (it was created for vectors only): pass vectors, or create it "
            "with model=<name or checkpoint>"
        )
    if "checkpoint" in reference:
        path = reference["checkpoint"]
        if not os.path.isfile(path):
            raise MissingFileError(f"the model checkpoint this index was built with is gone: {path}")
        if sha256_file(path) != reference["sha256"]:
            raise InputError(
                f"checkpoint {path} changed since the index was built; its embeddings would not match "
                "the indexed ones: restore it or re-index with `metrank index`"
            )
        return load_model_file(path)
    if "embedded" in reference:
        if directory is None:
            raise InputError("this retriever's model was given as an object and has not been saved yet")
        return load_model_file(os.path.join(directory, reference["embedded"]))
    raise InputError(f"unknown model reference {dict(reference)}")


def save_model(directory: str, reference: Mapping[str, Any], source_directory: str | None, model: Callable) -> None:
    """Write ``model.pt`` for references of kind "embedded" (copied from ``source_directory`` when it has one,
    else ``model()`` is saved)."""
    if "embedded" not in reference:
        return
    target = os.path.join(directory, reference["embedded"])
    if os.path.exists(target):
        return
    source = os.path.join(source_directory, reference["embedded"]) if source_directory else None
    if source and os.path.isfile(source):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:
        save_checkpoint(target, model())


# ------------------------------------------------------------------------------------------------ background
class Snapshotter:
    """Snapshot a retriever in the background: after ``every_writes`` acknowledged writes, or ``every_seconds``
    after the first unsnapshotted write, and once more on :meth:`stop` if anything changed.

    Snapshots only bound the replay work on the next load: every acknowledged write is already durable in the
    item store. While the index file is written, searches go on and writes wait. A failed snapshot (disk full) is
    kept in ``error`` and retried at the next trigger. ``with Snapshotter(retriever): ...`` runs it for the block.
    """

    def __init__(self, retriever, every_writes: int = 1000, every_seconds: float = 60.0, poll: float = 0.2) -> None:
        if every_writes < 1 or not every_seconds > 0:
            raise InputError("every_writes must be >= 1 and every_seconds > 0")
        self.retriever = retriever
        self.every_writes = int(every_writes)
        self.every_seconds = float(every_seconds)
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.snapshots = 0
        self.error: BaseException | None = None

    def start(self) -> Snapshotter:
        self._thread = threading.Thread(target=self._run, name="metrank-snapshotter", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        first_pending = None
        while not self._stop.wait(self.poll):
            pending = self.retriever.pending_writes
            if pending == 0:
                first_pending = None
                continue
            first_pending = first_pending or time.monotonic()
            if pending >= self.every_writes or time.monotonic() - first_pending >= self.every_seconds:
                try:
                    self.retriever.save()
                    self.snapshots += 1
                    self.error = None
                except Exception as err:  # e.g. disk full: the writes stay durable in the store; retry later
                    self.error = err
                first_pending = None

    def stop(self, final_snapshot: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final_snapshot and self.retriever.pending_writes:
            self.retriever.save()
            self.snapshots += 1

    def __enter__(self) -> Snapshotter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
