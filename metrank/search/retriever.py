"""``Retriever``: embed items with a retrieval model, keep them in a FAISS index + SQLite store, search with filters.

    >>> r = Retriever.create(model="lite0-minilm", media_roots=["photos"])   # or a checkpoint path / RetrievalModel
    >>> ids = r.add(images=["photos/cat.png", "photos/dog.png"], metadata=[{"kind": "pet"}, {"kind": "pet"}])
    >>> r.add(texts=["a cat", "a dog"])
    >>> r.search(text="a small cat", k=5, modality="image", filter={"kind": ["pet", "wild"]})
    >>> r.save("my_index"); r = Retriever.load("my_index")

Storage: vectors go to a :class:`metrank.index.Index` (inner product; use L2-normalised vectors for cosine), items
(modality, file path, text, JSON metadata and the vector itself) to an :class:`ItemStore`. Keeping vectors in the
store lets removal rebuild indexes that cannot remove (HNSW), lets a query bank for hubness correction be added
later, lets very selective filters be answered by exact scoring (:mod:`metrank.search.planner`), and lets a load
bring an older index snapshot up to date.

Durability: a retriever that has been saved (or loaded) works on ``<directory>/items.sqlite``. With
``autocommit=True`` (the default) every ``add``/``remove`` is committed to it (WAL, ``synchronous=FULL``) before it
returns: a process killed right after loses nothing. ``save()`` is then a snapshot of the index that makes the next
load faster; :class:`~metrank.search.snapshot.Snapshotter` takes them in the background. With
``autocommit=False`` writes stay in one open transaction until :meth:`commit` or :meth:`save` (faster bulk
loading; a crash rolls back to the last commit). A never-saved retriever lives in memory.

Image files: an item added by path is stored with its real path, which must lie under one of the retriever's
``media_roots`` (declared at creation or with :meth:`add_media_root`) or its own ``<directory>/media``; anything
else is refused when added, so the HTTP service can only ever serve files inside those folders.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from tqdm.auto import tqdm

import metrank.search.snapshot as snapshots
from metrank.errors import InputError, MissingFileError, NotFoundError, StateError
from metrank.images import open_rgb, to_rgb
from metrank.index import Index, create_index
from metrank.search.hubness import HubnessState, create_hubness
from metrank.search.planner import Row, plan_search
from metrank.search.rwlock import ReadWriteLock
from metrank.search.store import (
    INT64_MAX,
    MODALITIES,
    FilterSpec,
    Item,
    ItemStore,
    metadata_json,
)
from metrank.validation import check_embeddings, check_positive_int

MANIFEST = snapshots.MANIFEST
MAX_ID = 2**53 - 1  # ids stay exact in JSON readers that use doubles (JavaScript)
MAX_NORM = 1e9  # larger vectors overflow float32 inner products (3.4e38)
if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, os.PathLike, "Image.Image"]


@dataclass
class Hit(Item):
    """One search result: the item (without its vector) plus ``score``, the (corrected) similarity, and
    ``raw_score``, the plain inner product."""

    score: float = 0.0
    raw_score: float = 0.0


def _open_image(image: ImageInput):
    """RGB PIL image (transparency composited on white, as in training) from a path or a PIL image."""
    from PIL import Image

    return to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image)


def _check_vectors(x: Any, what: str, dim: int) -> np.ndarray:
    check_embeddings(x, what, dim)
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=-1)
    if (norms > MAX_NORM).any():
        worst = float(norms.max())
        raise InputError(f"{what} have norms up to {worst:.3g}; the norm must be at most {MAX_NORM:g} (L2-normalise)")
    return x


def _check_ids(ids: Any, n: int) -> np.ndarray:
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InputError(
            f"ids must be {n} integers (one per item), got {np.asarray(ids).shape} {np.asarray(ids).dtype}"
        )
    lo, hi = min(values), max(values)
    if lo < 0 or hi > MAX_ID:
        raise InputError(f"ids must be between 0 and 2**53-1 = {MAX_ID}, got {lo if lo < 0 else hi}")
    if len(set(values)) != n:
        raise InputError("ids must be unique")
    return np.array(values, dtype=np.int64)


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


class Retriever:
    """Embed, store, filter and search items (see the module docstring). Thread-safe: searches run concurrently,
    ``add``/``remove``/``set_hubness`` are exclusive. Build with :meth:`create` (in memory until the first
    :meth:`save`) or :meth:`load` (``autocommit=True``: every write is committed before it returns)."""

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
        self._seq = int(store.get_info("seq", 0))
        self.pending_writes = 0  # writes since the last snapshot

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        model: Any = None,
        index_spec: str = "Flat",
        dim: int | None = None,
        device: str = "auto",
        media_roots: Sequence[str | os.PathLike] = (),
    ) -> Retriever:
        """A new, empty, in-memory retriever (durable from its first :meth:`save`).

        ``model``: a ``RetrievalModel``, a checkpoint path (``metrank.encoders.save_checkpoint``) or a model name
        (``"lite0-minilm"``); None for a vectors-only retriever, which then needs ``dim``. ``index_spec``: a FAISS
        factory string or ``metrank.index`` short name (IVF/PQ indexes need :meth:`train` before the first add).
        ``media_roots``: folders whose image files may be added by path (and served over HTTP).
        """
        model_object, reference = snapshots.resolve_model(model)
        if model_object is not None:
            if dim is not None and dim != model_object.embed_dim:
                raise InputError(f"dim={dim} does not match the model's embed_dim={model_object.embed_dim}")
            dim = int(model_object.embed_dim)
        if dim is None:
            raise InputError("a vectors-only retriever (model=None) needs dim=<vector length>")
        index = create_index(index_spec, dim=int(dim), metric="ip", device=device)
        retriever = cls(index, ItemStore(int(dim)), reference, index_spec, model=model_object)
        for root in media_roots:
            retriever.add_media_root(root)
        return retriever

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def model(self):
        """The retrieval model, built on first use from the saved reference."""
        with self._model_lock:
            if self._model is None:
                self._model = snapshots.build_model(self.model_reference, self.directory)
            return self._model

    def __len__(self) -> int:
        return self.index.ntotal

    # ------------------------------------------------------------------------------------------------ media
    @property
    def media_dir(self) -> str | None:
        """``<directory>/media``: where the HTTP service keeps uploaded images (always an allowed root)."""
        return os.path.join(self.directory, "media") if self.directory else None

    @property
    def media_roots(self) -> list[str]:
        return list(self.store.get_info("media_roots", []))

    def add_media_root(self, folder: str | os.PathLike) -> None:
        """Allow image files under ``folder`` (an existing directory) to be added by path and served."""
        real = os.path.realpath(os.fspath(folder))
        if not os.path.isdir(real):
            raise InputError(f"media root {os.fspath(folder)!r} is not an existing folder")
        with self._lock.write():
            roots = self.media_roots
            if real not in roots:
                with self.store.transaction():
                    self.store.set_info("media_roots", roots + [real])

    def _allowed_roots(self) -> list[str]:
        own = [os.path.realpath(self.media_dir)] if self.media_dir else []
        return self.media_roots + own

    def _image_path(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(os.fspath(path))
        roots = self._allowed_roots()
        if not any(_under(real, root) for root in roots):
            raise InputError(
                f"image {os.fspath(path)!r} is outside the retriever's media roots ({len(roots)} declared): "
                "declare its folder with Retriever.create(..., media_roots=[...]), add_media_root() or "
                "`metrank index --media-root DIR`"
            )
        if not os.path.isfile(real):
            raise InputError(f"image {os.fspath(path)!r} is not a regular file")
        return real

    def image_file(self, id: int) -> str:
        """The image file of item ``id``, re-checked to lie under the media roots; ``NotFoundError`` otherwise."""
        item = self.get(id)
        if not item.path:
            raise NotFoundError(f"item {item.id} has no image file")
        real = os.path.realpath(item.path)
        if not any(_under(real, root) for root in self._allowed_roots()) or not os.path.isfile(real):
            raise NotFoundError(f"item {item.id}'s image file is gone or outside the media roots")
        return real

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
        """Add items; returns their ids. Durable when it returns (see the module docstring).

        ``images``: file paths under the media roots (served back by the HTTP app) or PIL images; ``texts``:
        strings (at most one of the two). ``vectors``: [n, dim] embeddings - alone for bare vectors (``modality``
        labels them, default "vector"), or together with ``images``/``texts`` as their precomputed embeddings
        (the model is skipped). ``metadata``: one JSON object per item (finite numbers, 64-bit integers); ``ids``:
        unique integers in [0, 2**53) (default: numbered on from the largest id ever assigned). Everything is
        embedded and checked first, so a failure adds nothing.
        """
        if images is not None and texts is not None:
            raise InputError("pass images= or texts=, not both (add them in two calls)")
        if images is None and texts is None and vectors is None:
            raise InputError("nothing to add: pass images=, texts= or vectors=")
        paths = texts_column = None
        if images is not None:
            images = list(images)
            missing = [os.fspath(p) for p in images if isinstance(p, (str, os.PathLike)) and not os.path.exists(p)]
            if missing:
                raise MissingFileError(f"{len(missing)} image files not found, e.g. {missing[:3]}")
            paths = [self._image_path(p) if isinstance(p, (str, os.PathLike)) else None for p in images]
            n, kind = len(images), "image"
        elif texts is not None:
            texts_column = list(texts)
            if not all(isinstance(t, str) and t.strip() for t in texts_column):
                raise InputError("texts must be non-empty strings")
            n, kind = len(texts_column), "text"
        else:
            n, kind = len(np.asarray(vectors)), modality or "vector"
        if modality is not None and modality != kind:
            raise InputError(f"modality={modality!r} contradicts the {kind} items given")
        if kind not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if n == 0:
            raise InputError("no items to add (empty list)")
        if vectors is not None:
            vectors = _check_vectors(vectors, "vectors", self.dim)
            if len(vectors) != n:
                raise InputError(f"got {len(vectors)} vectors for {n} {kind}s")
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        if len(metadata) != n:
            raise InputError(f"metadata must be a list of {n} dicts (one per item), got {len(metadata)} entries")
        meta = [metadata_json(m, f"metadata[{j}]") for j, m in enumerate(metadata)]
        explicit = _check_ids(ids, n) if ids is not None else None
        if vectors is None:
            vectors = (
                self.embed_images(images or [], batch_size=batch_size, progress=progress)
                if kind == "image"
                else self.embed_texts(texts_column or [], batch_size=batch_size, progress=progress)
            )
        with self._lock.write():
            if explicit is None:
                if self._next_id + n - 1 > MAX_ID:
                    raise InputError(f"no automatic ids left below 2**53 (next id {self._next_id}); pass ids=")
                new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            else:
                new_ids = explicit
            next_id = max(self._next_id, int(new_ids.max()) + 1)
            indexed = False
            try:
                with self.store.transaction():  # committed (durable) before add returns
                    self.store.insert(new_ids, kind, vectors, meta, paths=paths, texts=texts_column, seq=self._seq + 1)
                    self.store.set_info("next_id", next_id)
                    self.store.set_info("seq", self._seq + 1)
                    self._index_add(new_ids, vectors, kind)  # e.g. an untrained IVF index fails: nothing committed
                    indexed = True
            except BaseException:
                if indexed:  # the commit itself failed (disk full): undo the index change
                    self._index_remove(new_ids)
                raise
            self._seq += 1
            self._next_id = next_id
            self.pending_writes += 1
        return new_ids

    def _index_add(self, ids: np.ndarray, vectors: np.ndarray, modality: str) -> None:
        self.index.add(vectors, ids)
        if self.hubness is not None and self.hubness.modality in (None, modality):
            self.hubness.add_items(ids, vectors)

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id (durable when it returns); ``NotFoundError`` naming unknown ids (and nothing removed)
        if any is unknown."""
        values = np.ravel(np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))).tolist()
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise InputError("ids to remove must be integers")
        unique = np.unique(np.array([v for v in values if 0 <= v <= INT64_MAX], dtype=np.int64))
        if not values:
            return 0
        with self._lock.write():
            unknown = set(values) - self.store.existing(unique)
            if unknown:
                raise NotFoundError(f"unknown ids: {sorted(unknown)[:10]}")
            with self.store.transaction():
                self.store.delete(unique)
                self.store.set_info("seq", self._seq + 1)
            self._seq += 1
            self.pending_writes += 1
            return self._index_remove(unique)

    def _index_remove(self, ids: np.ndarray) -> int:
        """Drop ``ids`` from the index (rebuilding indexes without removal from the store) and the hubness state."""
        try:
            removed = self.index.remove_ids(ids)
        except InputError:  # index type without removal (HNSW): rebuild it from the stored vectors
            keep = np.setdiff1d(self.index.stored_ids(), ids)
            items = self.store.get(keep.tolist())
            fresh = create_index(self.index_spec, dim=self.dim, metric="ip")
            if keep.size:
                fresh.add(np.stack([np.asarray(items[int(i)].vector) for i in keep]), keep)
            removed = self.index.ntotal - fresh.ntotal
            self.index = fresh
        if self.hubness is not None:
            stale = self.hubness.remove_items(ids)
            if stale.size:
                where = self.store.where(modality=self.hubness.modality)
                rows = plan_search(self.index, self.store, self.hubness.bank[stale], 1, where, None)
                self.hubness.set_top1(
                    stale,
                    np.array([r[0][2] if r else -np.inf for r in rows]),
                    np.array([r[0][0] if r else -1 for r in rows], dtype=np.int64),
                )
        return removed

    def set_hubness(
        self, method: str | None, bank: np.ndarray | None = None, modality: str | None = None, **params: Any
    ) -> None:
        """Enable query-time hubness correction (``"qb_norm"`` with ``beta``, ``"nnn"`` with ``alpha``, ``k``) with a
        bank of reference query embeddings (e.g. training captions embedded by this model), covering the gallery
        items of ``modality`` (None = all); ``method=None`` disables it. Biases of stored items are computed now,
        those of later items as they are added. Kept in the index snapshot: a saved retriever snapshots at once."""
        with self._lock.write():
            if method is None:
                self.hubness = None
            else:
                if bank is None:
                    raise InputError(f"hubness method {method!r} needs bank=<[n, {self.dim}] query embeddings>")
                bank = _check_vectors(bank, "query bank", self.dim)
                state = HubnessState(create_hubness(method, **params), bank, modality)
                ids, vectors = self.store.vectors(self.store.where(modality=modality))
                if len(ids):
                    state.add_items(ids, vectors)
                self.hubness = state
            self.pending_writes += 1
        if self.directory and self.store.autocommit:
            self.save()

    def commit(self) -> None:
        """Commit the open transaction of an ``autocommit=False`` retriever (no-op otherwise)."""
        with self._lock.write():
            self.store.commit()

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
        return self.search_vectors(self.embed_query(text, image, vector), k, filter, modality, hubness)[0]

    def embed_query(
        self, text: str | None = None, image: ImageInput | None = None, vector: np.ndarray | None = None
    ) -> np.ndarray:
        """The [1, dim] embedding of one query (exactly one of text / image / vector)."""
        given = [name for name, v in (("text", text), ("image", image), ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise InputError(f"pass exactly one of text=, image=, vector= (got {given or 'none'})")
        if text is not None:
            if not isinstance(text, str):
                raise InputError(f"text must be a string, got {type(text).__name__}")
            return self.embed_texts([text], progress=False)
        if image is not None:
            return self.embed_images([image], progress=False)
        query = np.asarray(vector, dtype=np.float32)
        if query.ndim != 1:
            raise InputError(
                f"vector must be 1-D with {self.dim} values, got shape {query.shape}; use "
                "search_vectors for several queries"
            )
        return query[None, :]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        filter: FilterSpec | None = None,
        modality: str | None = None,
        hubness: bool = True,
    ) -> list[list[Hit]]:
        """Batched :meth:`search` for query embeddings [n, dim]."""
        queries = _check_vectors(queries, "query vectors", self.dim)
        k = check_positive_int(k, "k")
        where = self.store.where(filter, modality)
        with self._lock.read():
            state = self.hubness if hubness else None
            rows = plan_search(self.index, self.store, queries, int(k), where, state, modality)
            return self._hits(rows)

    def _hits(self, rows: list[Row]) -> list[list[Hit]]:
        items = self.store.get([i for row in rows for i, _, _ in row], with_vectors=False)
        return [
            [Hit(i, items[i].modality, items[i].path, items[i].text, items[i].metadata, None, s, r) for i, s, r in row]
            for row in rows
        ]

    # ------------------------------------------------------------------------------------------------ lookup
    def get(self, id: int) -> Item:
        """The stored item (metadata, path, text, vector); ``NotFoundError`` if unknown."""
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise InputError(f"id must be an integer, got {type(id).__name__}")
        item = self.store.get([int(id)]).get(int(id)) if 0 <= int(id) <= INT64_MAX else None
        if item is None:
            raise NotFoundError(f"unknown id {id}")
        return item

    def stats(self) -> dict[str, Any]:
        """Counts and settings (no server paths: folders and checkpoints are given by name only)."""
        with self._lock.read():
            model = self.model_reference
            return {
                "items": self.index.ntotal,
                "dim": self.dim,
                "index_spec": self.index_spec,
                "index_bytes": self.index.memory_bytes(),
                "modalities": self.store.modality_counts(),
                "model": os.path.basename(model["checkpoint"]) if "checkpoint" in model else model.get("name"),
                "directory": os.path.basename(self.directory) if self.directory else None,
                "durable": self.store.path is not None and self.store.autocommit,
                "pending_writes": self.pending_writes,
                "media_roots": len(self.media_roots),
                "hubness": self.hubness.describe() if self.hubness is not None else None,
            }

    # ------------------------------------------------------------------------------------------------ persistence
    def save(self, directory: str | None = None) -> str:
        """Snapshot the index into ``directory`` (default: the retriever's own folder) and switch ``MANIFEST.json``
        to it atomically; older snapshots are deleted. The first save of an in-memory retriever also copies its
        items to ``<directory>/items.sqlite``, where every later write is committed. Returns the snapshot path."""
        directory = os.path.abspath(directory or self.directory or "")
        if not directory or directory == os.path.abspath(""):
            raise InputError("save needs a directory (this retriever was never saved or loaded)")
        db_path = os.path.join(directory, snapshots.DB_FILE)
        moving = self.store.path != db_path
        if moving and os.path.isdir(directory) and snapshots.read_manifest(directory) is not None:
            raise InputError(
                f"{directory} already holds another retriever; save into a new folder or remove that one first"
            )
        os.makedirs(directory, exist_ok=True)
        with self._save_lock:
            snapshots.save_model(directory, self.model_reference, self.directory, lambda: self.model)
            if moving:  # first save (or save-as): the store moves to the folder; nothing may use the old one
                with self._lock.write():
                    for leftover in (db_path, db_path + "-wal", db_path + "-shm"):  # of a killed first save
                        if os.path.exists(leftover):
                            os.remove(leftover)
                    self.store.commit()
                    previous, self.store = self.store, self.store.copy_to(db_path, autocommit=self.store.autocommit)
                    previous.close()
                    self.directory = directory
            with self._lock.read():  # a consistent view: writers wait, searches continue
                self.store.commit()
                config = {"dim": self.dim, "index_spec": self.index_spec, "model": self.model_reference}
                name = snapshots.write_snapshot(directory, self.index, self.hubness, {**config, "seq": self._seq})
                self.pending_writes = 0
            self.store.checkpoint()
        return os.path.join(directory, name)

    @classmethod
    def load(cls, directory: str, device: str = "auto", autocommit: bool = True) -> Retriever:
        """Open a saved retriever: the index snapshot ``MANIFEST.json`` points to (file hashes checked), the live
        item store, and the writes committed after the snapshot replayed into the index, which is then checked to
        hold exactly the store's ids. The model is built lazily, on the first text/image embedding."""
        directory = os.path.abspath(directory)
        config, index, hubness = snapshots.read_snapshot(directory, device=device)
        store = snapshots.open_store(directory, config["dim"], autocommit)
        retriever = cls(index, store, config["model"], config["index_spec"], directory=directory, hubness=hubness)
        drop, added = snapshots.replay_plan(store, index.stored_ids(), config["seq"])
        if drop.size:
            retriever._index_remove(drop)
        for modality, (ids, vectors) in added.items():
            retriever._index_add(ids, vectors, modality)
        index_ids, db_ids = np.sort(retriever.index.stored_ids()), store.all_ids()
        if not np.array_equal(index_ids, db_ids):
            raise StateError(
                f"{directory} is inconsistent after replay: index holds {len(index_ids)} ids, "
                f"{snapshots.DB_FILE} {len(db_ids)}; rebuild it with `metrank index`"
            )
        retriever.pending_writes = int(drop.size + sum(len(ids) for ids, _ in added.values()))
        return retriever

    def close(self) -> None:
        """Commit and close the item store (the retriever is unusable afterwards)."""
        with self._lock.write():
            self.store.close()
