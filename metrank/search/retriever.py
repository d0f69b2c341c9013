"""``Retriever``: embed items with a retrieval model, keep them in a FAISS index + SQLite store, search with filters.

    >>> r = Retriever.create(model="lite0-minilm")                  # or a checkpoint path or a RetrievalModel
    >>> ids = r.add(images=["cat.png", "dog.png"], metadata=[{"kind": "pet"}, {"kind": "pet"}])
    >>> r.add(texts=["a cat", "a dog"])
    >>> r.search(text="a small cat", k=5, modality="image", filter={"kind": ["pet", "wild"]})
    >>> r.save("my_index"); r = Retriever.load("my_index")

Storage: vectors go to a :class:`metrank.index.Index` (inner product; use L2-normalised vectors for cosine), items
(modality, file path, text, JSON metadata and the vector itself) to an in-memory :class:`ItemStore`. Keeping vectors
in the store lets removal rebuild indexes that cannot remove (HNSW), lets a query bank for hubness correction be
added later, and lets very selective filters be answered by exact scoring of the matching items.

Filtered search is exact: with ``c`` matching items out of ``N`` the index is asked for ``m ≈ 2·k·N/c``
candidates, the matching ones kept, and ``m`` grows until ``k`` matches are found or the index is exhausted; when
``m`` would exceed ``c`` the ``c`` matching vectors are scored directly instead. Hubness-corrected search
(:mod:`metrank.search.hubness`) uses the same loop with a stopping bound: an unfetched item scores at most
``s_m − min(bias)``, so the loop stops once the k-th corrected score beats that.

Persistence (``save``/``load``) writes a new snapshot folder ``v000007/`` (index, SQLite database, hubness state,
config) and then atomically replaces ``MANIFEST.json`` to point at it; a process killed at any moment leaves the
previous snapshot intact. ``load`` checks that the index's ids equal the database's ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from tqdm.auto import tqdm

from metrank.atomic import atomic_path, atomic_write_text
from metrank.errors import InputError, MissingFileError, NotFoundError
from metrank.index import Index, create_index
from metrank.search.hubness import HubnessState, create_hubness
from metrank.search.rwlock import ReadWriteLock
from metrank.search.store import MODALITIES, FilterSpec, Item, ItemStore, Where
from metrank.validation import check_embeddings

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
_SNAPSHOT = re.compile(r"^v(\d{6,})$")
if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, os.PathLike, "Image.Image"]


@dataclass
class Hit:
    """One search result. ``score`` is the (corrected) similarity; ``raw_score`` the plain inner product."""

    id: int
    score: float
    raw_score: float
    modality: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "raw_score": self.raw_score,
            "modality": self.modality,
            "metadata": self.metadata,
            "has_image": self.path is not None,
            "text": self.text,
        }


def _open_image(image: ImageInput):
    """RGB PIL image (transparency composited on white, as in training) from a path or a PIL image."""
    from PIL import Image

    from metrank.images import open_rgb, to_rgb

    return to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def _resolve_model(model: Any) -> tuple[Any, dict[str, Any]]:
    """``(model object, reference)``; the reference says how ``load`` rebuilds exactly this model: from the user's
    checkpoint file (path + SHA-256, checked on load) or from ``model.pt`` saved in the retriever directory (for
    model objects and names - a named model's projection heads may be freshly initialised, so the name alone
    would not reproduce the indexed embeddings)."""
    if model is None:
        return None, {}
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if os.path.isfile(model):
            from metrank.encoders import load_checkpoint

            path = os.path.abspath(model)
            return load_checkpoint(path), {"checkpoint": path, "sha256": _sha256(path)}
        if model.endswith((".pt", ".pth", ".ckpt")) or os.sep in model.replace("timm/", "").replace("open_clip/", ""):
            raise MissingFileError(f"checkpoint {model!r} not found")
        from metrank.encoders import create_model

        return create_model(model), {"embedded": "model.pt", "name": model}
    if hasattr(model, "embed_images") and hasattr(model, "embed_dim"):
        return model, {"embedded": "model.pt", "name": getattr(model, "config", {}).get("name")}
    raise InputError(f"model must be a RetrievalModel, a checkpoint path or a model name, got {type(model).__name__}")


def _build_model(reference: Mapping[str, Any], directory: str | None):
    if not reference:
        raise InputError(
            "this retriever has no model (it was created for vectors only): pass vectors, or create it "
            "with model=<name or checkpoint>"
        )
    from metrank.encoders import load_checkpoint

    if "checkpoint" in reference:
        path = reference["checkpoint"]
        if not os.path.isfile(path):
            raise MissingFileError(f"the model checkpoint this index was built with is gone: {path}")
        if _sha256(path) != reference["sha256"]:
            raise InputError(
                f"checkpoint {path} changed since the index was built; its embeddings would not match "
                "the indexed ones: restore it or re-index with `metrank index`"
            )
        return load_checkpoint(path)
    if "embedded" in reference:
        if directory is None:
            raise InputError("this retriever's model was given as an object and has not been saved yet")
        return load_checkpoint(os.path.join(directory, reference["embedded"]))
    raise InputError(f"unknown model reference {dict(reference)}")


class Retriever:
    """Embed, store, filter and search items (see the module docstring). Thread-safe: searches run concurrently,
    ``add``/``remove``/``set_hubness`` are exclusive."""

    def __init__(
        self,
        index: Index,
        store: ItemStore,
        model_reference: Mapping[str, Any],
        index_spec: str,
        model: Any = None,
        directory: str | None = None,
        hubness: HubnessState | None = None,
    ) -> None:
        if index.metric != "ip":
            raise InputError("Retriever needs an inner-product index (metric='ip'); L2-normalise vectors for cosine")
        self.index = index
        self.store = store
        self.index_spec = index_spec
        self.model_reference = dict(model_reference)
        self.directory = directory
        self.hubness = hubness
        self._model = model
        self._model_lock = threading.Lock()
        self._lock = ReadWriteLock()
        self._save_lock = threading.Lock()
        self._next_id = max(int(store.get_info("next_id", 0)), store.next_id())
        self.modified = False  # True after add/remove/set_hubness until the next save

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls, model: Any = None, index_spec: str = "Flat", dim: int | None = None, device: str = "auto"
    ) -> Retriever:
        """A new, empty retriever.

        ``model``: a ``RetrievalModel``, a checkpoint path (``metrank.encoders.save_checkpoint``) or a model name
        (``"lite0-minilm"``); None for a vectors-only retriever, which then needs ``dim``. ``index_spec``: a FAISS
        factory string or ``metrank.index`` short name (IVF/PQ indexes need :meth:`train` before the first add).
        """
        model_object, reference = _resolve_model(model)
        if model_object is not None:
            if dim is not None and dim != model_object.embed_dim:
                raise InputError(f"dim={dim} does not match the model's embed_dim={model_object.embed_dim}")
            dim = int(model_object.embed_dim)
        if dim is None:
            raise InputError("a vectors-only retriever (model=None) needs dim=<vector length>")
        index = create_index(index_spec, dim=int(dim), metric="ip", device=device)
        return cls(index, ItemStore(int(dim)), reference, index_spec, model=model_object)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def model(self):
        """The retrieval model, built on first use from the saved reference."""
        with self._model_lock:
            if self._model is None:
                self._model = _build_model(self.model_reference, self.directory)
            return self._model

    def __len__(self) -> int:
        return self.index.ntotal

    # ------------------------------------------------------------------------------------------------ embedding
    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """L2-normalised image embeddings, loading images from disk one batch at a time."""
        model = self.model
        out = np.empty((len(images), self.dim), np.float32)
        for start in tqdm(
            range(0, len(images), batch_size),
            desc="embed images",
            unit="batch",
            disable=not progress or len(images) <= batch_size,
        ):
            batch = [_open_image(img) for img in images[start : start + batch_size]]
            out[start : start + len(batch)] = model.embed_images(batch, batch_size=batch_size, progress=False)
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        model = self.model
        if not getattr(model, "has_text", False):
            raise InputError("this retriever's model has no text tower; use images or vectors")
        return np.asarray(model.embed_texts(list(texts), batch_size=batch_size, progress=progress), np.float32)

    # ------------------------------------------------------------------------------------------------ mutation
    def train(self, vectors: np.ndarray) -> None:
        """Train an IVF/PQ index on representative vectors (no-op need for Flat/HNSW)."""
        with self._lock.write():
            self.index.train(vectors)

    def add(
        self,
        images: Sequence[ImageInput] | None = None,
        texts: Sequence[str] | None = None,
        vectors: np.ndarray | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        ids: Sequence[int] | None = None,
        modality: str | None = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> np.ndarray:
        """Add items; returns their ids.

        ``images``: file paths (served back by the HTTP app) or PIL images; ``texts``: strings (at most one of the
        two). ``vectors``: [n, dim] embeddings - alone for bare vectors (``modality`` labels them, default
        "vector"), or together with ``images``/``texts`` as their precomputed embeddings (the model is skipped).
        ``metadata``: one JSON-serialisable dict per item; ``ids``: non-negative unique integers (default: numbered
        on from the largest id ever assigned). Everything is embedded and checked first, so a failure adds nothing.
        """
        if images is not None and texts is not None:
            raise InputError("pass images= or texts=, not both (add them in two calls)")
        if images is None and texts is None and vectors is None:
            raise InputError("nothing to add: pass images=, texts= or vectors=")
        paths = texts_column = None
        if images is not None:
            images = list(images)
            missing = [os.fspath(p) for p in images if isinstance(p, (str, os.PathLike)) and not os.path.isfile(p)]
            if missing:
                raise MissingFileError(f"{len(missing)} image files not found, e.g. {missing[:3]}")
            paths = [os.path.abspath(p) if isinstance(p, (str, os.PathLike)) else None for p in images]
            n, kind = len(images), "image"
        elif texts is not None:
            texts_column = list(texts)
            if not all(isinstance(t, str) and t.strip() for t in texts_column):
                raise InputError("texts must be non-empty strings")
            n, kind = len(texts_column), "text"
        else:
            n, kind = len(vectors), modality or "vector"
        if modality is not None and modality != kind:
            raise InputError(f"modality={modality!r} contradicts the {kind} items given")
        if kind not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if n == 0:
            raise InputError("no items to add (empty list)")
        if vectors is not None:
            check_embeddings(vectors, "vectors", self.dim)
            vectors = np.ascontiguousarray(np.asarray(vectors), dtype=np.float32)
            if len(vectors) != n:
                raise InputError(f"got {len(vectors)} vectors for {n} {kind}s")
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        if len(metadata) != n or not all(isinstance(m, Mapping) for m in metadata):
            raise InputError(f"metadata must be a list of {n} dicts (one per item), got {len(metadata)} entries")
        metadata_json = []
        for j, m in enumerate(metadata):
            try:
                metadata_json.append(json.dumps(dict(m), ensure_ascii=False))
            except (TypeError, ValueError) as err:
                raise InputError(f"metadata[{j}] is not JSON-serialisable: {err}") from None
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(f"ids must be {n} integers, got shape {ids.shape} dtype {ids.dtype}")
            if ids.min() < 0 or np.unique(ids).size != n:
                raise InputError("ids must be non-negative and unique")
        if vectors is None:
            vectors = (
                self.embed_images(images, batch_size=batch_size, progress=progress)
                if kind == "image"
                else self.embed_texts(texts_column, batch_size=batch_size, progress=progress)
            )
        modality = kind
        with self._lock.write():
            ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64) if ids is None else ids.astype(np.int64)
            self.store.insert(ids, modality, vectors, metadata_json, paths=paths, texts=texts_column)
            try:
                self.index.add(vectors, ids)
            except BaseException:
                self.store.delete(ids)
                raise
            self._next_id = max(self._next_id, int(ids.max()) + 1)
            self.store.set_info("next_id", self._next_id)
            if self.hubness is not None and self.hubness.modality in (None, modality):
                self.hubness.add_items(ids, vectors)
            self.modified = True
        return ids

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id; raises ``KeyError`` naming unknown ids (and removes nothing) if any is unknown."""
        ids = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64))
        if ids.size == 0:
            return 0
        with self._lock.write():
            unknown = set(ids.tolist()) - self.store.existing(ids)
            if unknown:
                raise NotFoundError(f"unknown ids: {sorted(unknown)[:10]}")
            try:
                removed = self.index.remove_ids(ids)
            except ValueError:  # index type without removal (HNSW): rebuild it from the stored vectors
                removed = self._rebuild_index_without(ids)
            self.store.delete(ids)
            self.modified = True
            if self.hubness is not None:
                stale = self.hubness.remove_items(ids)
                if stale.size:
                    where = self.store.where(modality=self.hubness.modality)
                    hits = self._search_locked(
                        self.hubness.bank[stale], 1, where, correct=False, modality=self.hubness.modality
                    )
                    self.hubness.set_top1(
                        stale,
                        np.array([h[0][2] if h else -np.inf for h in hits]),
                        np.array([h[0][0] if h else -1 for h in hits], dtype=np.int64),
                    )
        return removed

    def _rebuild_index_without(self, ids: np.ndarray) -> int:
        keep_ids, keep_vectors = self.store.vectors()
        mask = ~np.isin(keep_ids, ids)
        fresh = create_index(self.index_spec, dim=self.dim, metric="ip")
        if mask.any():
            fresh.add(keep_vectors[mask], keep_ids[mask])
        removed = self.index.ntotal - fresh.ntotal
        self.index = fresh
        return removed

    def set_hubness(
        self, method: str | None, bank: np.ndarray | None = None, modality: str | None = None, **params: Any
    ) -> None:
        """Enable query-time hubness correction (``"qb_norm"`` with ``beta``, ``"nnn"`` with ``alpha``, ``k``) with a
        bank of reference query embeddings (e.g. training captions embedded by this model), covering the gallery
        items of ``modality`` (None = all); ``method=None`` disables it. Biases of stored items are computed now,
        those of later items as they are added."""
        with self._lock.write():
            self.modified = True
            if method is None:
                self.hubness = None
                return
            if bank is None:
                raise InputError(f"hubness method {method!r} needs bank=<[n, {self.dim}] reference query embeddings>")
            check_embeddings(bank, "query bank", self.dim)
            state = HubnessState(create_hubness(method, **params), np.asarray(bank, np.float32), modality)
            ids, vectors = self.store.vectors(self.store.where(modality=modality))
            if len(ids):
                state.add_items(ids, vectors)
            self.hubness = state

    # ------------------------------------------------------------------------------------------------ search
    def search(
        self,
        text: str | None = None,
        image: ImageInput | None = None,
        vector: np.ndarray | None = None,
        k: int = 10,
        filter: FilterSpec | None = None,
        modality: str | None = None,
        hubness: bool = True,
    ) -> list[Hit]:
        """The ``k`` best items for one query (exactly one of text / image / vector), best first.

        ``filter``: ``{"key": value or [values]}`` on metadata (AND over keys); ``modality``: restrict to "image",
        "text" or "vector" items (text->image: ``text=..., modality="image"``). ``hubness=False`` skips a
        configured hubness correction.
        """
        given = [name for name, v in (("text", text), ("image", image), ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise InputError(f"pass exactly one of text=, image=, vector= (got {given or 'none'})")
        if text is not None:
            if not isinstance(text, str):
                raise InputError(f"text must be a string, got {type(text).__name__}")
            query = self.embed_texts([text], progress=False)
        elif image is not None:
            query = self.embed_images([image], progress=False)
        else:
            query = np.asarray(vector, dtype=np.float32) if not isinstance(vector, np.ndarray) else vector
            if query.ndim != 1:
                raise InputError(
                    f"vector must be 1-D with {self.dim} values, got shape {query.shape}; use "
                    "search_vectors for several queries"
                )
            query = query[None, :]
        return self.search_vectors(query, k=k, filter=filter, modality=modality, hubness=hubness)[0]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        filter: FilterSpec | None = None,
        modality: str | None = None,
        hubness: bool = True,
    ) -> list[list[Hit]]:
        """Batched :meth:`search` for query embeddings [n, dim]."""
        check_embeddings(queries, "query vectors", self.dim)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        with self._lock.read():
            where = self.store.where(filter, modality)
            rows = self._search_locked(queries, int(k), where, correct=hubness, modality=modality)
            items = self.store.get([i for row in rows for i, _, _ in row], with_vectors=False)
        return [
            [Hit(i, s, r, items[i].modality, items[i].metadata, items[i].path, items[i].text) for i, s, r in row]
            for row in rows
        ]

    def _search_locked(
        self, queries: np.ndarray, k: int, where: Where | None, correct: bool, modality: str | None = None
    ):
        """Rows of ``(id, score, raw_score)`` for items matching ``where`` (of ``modality``). Caller holds the lock."""
        total = self.index.ntotal
        if total == 0:
            return [[] for _ in queries]
        state = self.hubness if correct else None
        if where is not None:
            matches = self.store.count(where)
            if matches == 0:
                return [[] for _ in queries]
            fetch = math.ceil(2 * k * total / matches)
            if fetch >= matches or matches <= 4 * k:
                return self._score_matching(queries, k, where, state)
        else:
            fetch = k
        if state is not None:
            fetch *= 4
        fetch = min(total, max(fetch, k))
        min_bias = 0.0
        if state is not None:
            min_bias = state.min_bias()
            if len(state) < total and (state.modality is None or modality != state.modality):
                min_bias = min(min_bias, 0.0)  # uncovered items (bias 0) may be among the candidates
        results: list[list | None] = [None] * len(queries)
        pending = np.arange(len(queries))
        while pending.size:
            scores, ids = self.index.search(queries[pending], fetch)
            exhausted = fetch >= total
            allowed = None
            if where is not None:
                allowed = np.fromiter(self.store.matching(np.unique(ids[ids >= 0]), where), dtype=np.int64)
            still = []
            for row, q in enumerate(pending):
                keep = ids[row] >= 0
                if allowed is not None:
                    keep &= np.isin(ids[row], allowed)
                cand_ids, raw = ids[row][keep], scores[row][keep].astype(np.float64)
                corrected, applied = raw, False
                if state is not None and cand_ids.size:
                    applied = bool(state.applies(cand_ids[:1])[0])
                    if applied:
                        corrected = raw - state.bias(cand_ids)
                top = _top_k(cand_ids, corrected, raw, k)
                bound = float(scores[row, -1]) - (min_bias if applied else 0.0)
                if exhausted or (len(top) == k and top[-1][1] >= bound):
                    results[q] = top
                else:
                    still.append(q)
            pending = np.array(still, dtype=np.int64)
            fetch = min(total, fetch * 4)
        return results

    def _score_matching(self, queries: np.ndarray, k: int, where: Where, state: HubnessState | None):
        """Exact scoring of the (few) items matching ``where``."""
        ids, vectors = self.store.vectors(where)
        sims = queries @ vectors.T
        out = []
        for row in sims:
            raw = row.astype(np.float64)
            corrected = raw
            if state is not None and state.applies(ids[np.argmax(raw)][None])[0]:
                corrected = raw - state.bias(ids)
            out.append(_top_k(ids, corrected, raw, k))
        return out

    # ------------------------------------------------------------------------------------------------ lookup
    def get(self, id: int) -> Item:
        """The stored item (metadata, path, text, vector); ``KeyError`` if unknown."""
        item = self.store.get([int(id)]).get(int(id))
        if item is None:
            raise NotFoundError(f"unknown id {id}")
        return item

    def stats(self) -> dict[str, Any]:
        with self._lock.read():
            return {
                "items": self.index.ntotal,
                "dim": self.dim,
                "index_spec": self.index_spec,
                "index_bytes": self.index.memory_bytes(),
                "modalities": self.store.modality_counts(),
                "model": self.model_reference or None,
                "directory": self.directory,
                "hubness": self.hubness.describe() if self.hubness is not None else None,
            }

    # ------------------------------------------------------------------------------------------------ persistence
    def save(self, directory: str | None = None) -> str:
        """Write a new snapshot into ``directory`` (default: where this retriever was loaded from / last saved)
        and switch ``MANIFEST.json`` to it atomically; older snapshots are then deleted. Returns the snapshot path."""
        directory = os.path.abspath(directory or self.directory or "")
        if not directory or directory == os.path.abspath(""):
            raise InputError("save needs a directory (this retriever was never saved or loaded)")
        os.makedirs(directory, exist_ok=True)
        with self._save_lock, self._lock.read():  # a consistent view: writers wait, searches continue
            self._save_model(directory)
            number = 1 + max(
                [_read_manifest(directory).get("version", 0)]
                + [int(m.group(1)) for m in map(_SNAPSHOT.match, os.listdir(directory)) if m]
            )
            name = f"v{number:06d}"
            tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            try:
                self.index.save(os.path.join(tmp, "index.faiss"))
                self.store.save(os.path.join(tmp, "items.sqlite"))
                if self.hubness is not None:
                    self.hubness.save(tmp)
                ids = self.store.all_ids()
                files = sorted(os.listdir(tmp))
                config = {
                    "format": FORMAT_VERSION,
                    "dim": self.dim,
                    "index_spec": self.index_spec,
                    "model": self.model_reference,
                    "items": int(len(ids)),
                    "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                    "files": {f: _sha256(os.path.join(tmp, f)) for f in files},
                }
                _write_json_atomic(os.path.join(tmp, "config.json"), config)
                for f in files:
                    with open(os.path.join(tmp, f), "rb") as handle:
                        os.fsync(handle.fileno())
                _fsync_dir(tmp)
                os.rename(tmp, os.path.join(directory, name))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _write_json_atomic(os.path.join(directory, MANIFEST), {"version": number, "snapshot": name})
            _fsync_dir(directory)
            self.modified = False
        for entry in os.listdir(directory):  # older snapshots and leftovers of killed saves
            if entry != name and (_SNAPSHOT.match(entry) or (entry.startswith(".v") and entry.endswith(".tmp"))):
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
        self.directory = directory
        return os.path.join(directory, name)

    def _save_model(self, directory: str) -> None:
        if "embedded" not in self.model_reference:
            return
        target = os.path.join(directory, self.model_reference["embedded"])
        if os.path.exists(target):
            return
        source = os.path.join(self.directory, self.model_reference["embedded"]) if self.directory else None
        if source and os.path.isfile(source):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        else:
            from metrank.encoders import save_checkpoint

            save_checkpoint(target, self.model)

    @classmethod
    def load(cls, directory: str, device: str = "auto") -> Retriever:
        """Open the snapshot ``MANIFEST.json`` points to, checking file hashes and that index ids == database ids.
        The model is built lazily, on the first text/image embedding."""
        directory = os.path.abspath(directory)
        manifest = _read_manifest(directory)
        if not manifest:
            raise MissingFileError(f"no retriever saved in {directory!r} (missing {MANIFEST})")
        snapshot = os.path.join(directory, manifest["snapshot"])
        with open(os.path.join(snapshot, "config.json")) as f:
            config = json.load(f)
        if config.get("format") != FORMAT_VERSION:
            raise InputError(f"{snapshot} has format {config.get('format')}, this metrank reads {FORMAT_VERSION}")
        for name, digest in config["files"].items():
            if _sha256(os.path.join(snapshot, name)) != digest:
                raise InputError(f"{snapshot}/{name} is corrupt (checksum mismatch); restore it from a backup")
        index = Index.load(os.path.join(snapshot, "index.faiss"), device=device)
        store = ItemStore.load(os.path.join(snapshot, "items.sqlite"), config["dim"])
        db_ids = store.all_ids()
        index_ids = np.sort(index.stored_ids())
        if hashlib.sha256(db_ids.tobytes()).hexdigest() != config["ids_sha256"] or not np.array_equal(
            db_ids, index_ids
        ):
            raise InputError(
                f"{snapshot} is inconsistent: index holds {len(index_ids)} ids, database "
                f"{len(db_ids)}; rebuild it with `metrank index`"
            )
        return cls(
            index,
            store,
            config["model"],
            config["index_spec"],
            directory=directory,
            hubness=HubnessState.load(snapshot),
        )


def _read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _top_k(ids: np.ndarray, corrected: np.ndarray, raw: np.ndarray, k: int) -> list:
    """``k`` best ``(id, score, raw_score)`` by corrected score (ties: smaller id first)."""
    order = np.lexsort((ids, -corrected))[:k]
    return [(int(ids[j]), float(corrected[j]), float(raw[j])) for j in order]
