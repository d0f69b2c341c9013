"""A FAISS index with 64-bit ids, batched search, atomic save/load and automatic GPU use.

``create_index(spec, dim)`` takes a FAISS factory string ("Flat", "IVF1024,Flat", "HNSW32", "IVF256,PQ16", ...) or
a short name from ``INDEX_SPECS`` ("flat", "ivf_flat", "hnsw", "ivf_pq"). Ids are 64-bit integers chosen by the
caller (or numbered on from the largest id so far): IVF indexes store them natively, every other index is wrapped in
``faiss.IndexIDMap2`` (IVF is not, because ``IndexIDMap.remove_ids`` assumes the inner index renumbers its entries in
order after a removal, which inverted lists do not do).

The CPU index is always the master copy. When FAISS sees GPUs (``device="auto"``) a GPU clone made with
``faiss.index_cpu_to_gpu_multiple_py`` over all GPUs (sharded or replicated: ``GpuMultipleClonerOptions.shard``) answers
searches; it is rebuilt lazily after ``add``/``remove_ids``/parameter changes. Searches asking for more neighbours
than the GPU k-selection supports (``k > GPU_MAX_K``) and index types FAISS cannot put on a GPU (HNSW, PQ) are
answered by the CPU copy.

An IVF index whose inverted lists are a file (``OnDiskInvertedLists``, e.g. a ``metrank scale index --on-disk``
build) keeps them in ``index.ivfdata`` beside its ``index.faiss`` (``lists_file``): ``save`` copies them there, so
a saved index owns its lists, and ``load`` maps them read-only -- such an index searches, and refuses to add or
remove (FAISS would abort the process writing to a read-only map); rebuild it instead.

Scores: inner products for ``metric="ip"`` (higher is better), squared L2 distances for ``metric="l2"`` (lower is
better). Result slots past the number of stored items hold id -1 and score -inf (ip) or +inf (l2).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from metrank.atomic import atomic_path
from metrank.errors import InputError, MissingFileError, StateError
from metrank.registry import Registry
from metrank.validation import check_embeddings, check_positive_int

Array = np.ndarray | torch.Tensor

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
LISTS_SUFFIX = ".ivfdata"  # on-disk inverted lists: index.faiss -> index.ivfdata
GPU_MAX_K = 2048  # largest k (and nprobe) the FAISS GPU k-selection supports

INDEX_SPECS: Registry[str] = Registry("index type")


@INDEX_SPECS.register("flat")
def flat_spec(dim: int) -> str:
    """Exact search (brute force)."""
    return "Flat"


@INDEX_SPECS.register("ivf_flat")
def ivf_flat_spec(dim: int, nlist: int = 1024) -> str:
    """Inverted file with ``nlist`` k-means cells; full vectors stored (needs ``train``)."""
    return f"IVF{nlist},Flat"


@INDEX_SPECS.register("hnsw")
def hnsw_spec(dim: int, m: int = 32) -> str:
    """HNSW graph with ``m`` links per node (no training; no removal)."""
    return f"HNSW{m}"


@INDEX_SPECS.register("ivf_pq")
def ivf_pq_spec(dim: int, nlist: int = 1024, m: int | None = None, nbits: int = 8) -> str:
    """Inverted file + product quantisation: ``m`` sub-quantisers of ``nbits`` bits each (default ``m``: the largest
    divisor of ``dim`` that is at most ``min(64, dim // 4)``, i.e. 64 bytes per 512-d vector) - for galleries that
    do not fit in memory."""
    if m is None:
        m = max(d for d in range(1, max(1, min(64, dim // 4)) + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}x{nbits}"


def _as_float32(x: Array, name: str, dim: int | None = None) -> np.ndarray:
    check_embeddings(x, name, dim)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_ids(ids: Array, n: int) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InputError(f"ids must be 1-D with one id per vector ({n}), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"ids must have an integer dtype, got {ids.dtype}")
    if n and ids.min() < 0:
        raise InputError("ids must be non-negative (-1 marks empty result slots)")
    if np.unique(ids).size != n:
        raise InputError("ids contain duplicates; every vector needs its own id")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _inner(index: faiss.Index) -> faiss.Index:
    """The index inside IDMap / pre-transform wrappers (the one that holds the vectors)."""
    index = faiss.downcast_index(index)
    while hasattr(index, "index") and isinstance(index.index, faiss.Index):
        index = faiss.downcast_index(index.index)
    return index


class Index:
    """A FAISS index (see the module docstring). Build with ``create_index`` or ``Index.load``."""

    def __init__(self, index: faiss.Index, spec: str = "", device: str = "auto", gpu_mode: str = "shard") -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise InputError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if gpu_mode not in ("shard", "replicate"):
            raise InputError(f"gpu_mode must be 'shard' or 'replicate', got {gpu_mode!r}")
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if device == "gpu" and n_gpus == 0:
            raise InputError("device='gpu' but FAISS sees no GPU (is faiss-gpu installed?); use device='cpu' or 'auto'")
        self._cpu = index
        self.spec = spec or type(_inner(index)).__name__
        self.use_gpu = device != "cpu" and n_gpus > 0
        self.gpu_mode = gpu_mode
        self._gpu: faiss.Index | None = None  # GPU clone of _cpu (sharded/replicated), rebuilt after changes
        self._gpu_resources: list | None = None
        self._next_id: int | None = None

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._cpu.d

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def metric(self) -> str:
        return "ip" if self._cpu.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    @property
    def nprobe(self) -> int:
        return self._ivf("nprobe").nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._ivf("nprobe").nprobe = int(value)
        self._gpu = None

    @property
    def efSearch(self) -> int:
        return self._hnsw().efSearch

    @efSearch.setter
    def efSearch(self, value: int) -> None:
        self._hnsw().efSearch = int(value)

    def _ivf(self, what: str) -> faiss.IndexIVF:
        ivf = faiss.try_extract_index_ivf(self._cpu)
        if ivf is None:
            raise InputError(f"{what} applies to IVF indexes only; this index is {self.spec!r}")
        return ivf

    def _hnsw(self) -> faiss.HNSW:
        inner = _inner(self._cpu)
        if not hasattr(inner, "hnsw"):
            raise InputError(f"efSearch applies to HNSW indexes only; this index is {self.spec!r}")
        return inner.hnsw

    def __repr__(self) -> str:
        where = f"gpu:{self.gpu_mode}" if self.use_gpu else "cpu"
        return f"Index({self.spec!r}, dim={self.dim}, metric={self.metric!r}, ntotal={self.ntotal}, device={where})"

    # ---- building ---------------------------------------------------------------------------------------------
    def train(self, x: Array, max_train: int | None = 100_000, seed: int = 0) -> Index:
        """Train IVF centroids / PQ codebooks on at most ``max_train`` rows drawn at random from ``x``."""
        x = _as_float32(x, "training vectors", self.dim)
        if max_train is not None and x.shape[0] > max_train:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_train, replace=False))]
        try:
            self._cpu.train(x)
        except RuntimeError as err:  # e.g. fewer training points than IVF cells
            raise InputError(f"training {self.spec!r} on {x.shape[0]} vectors failed: {err}") from None
        self._gpu = None
        return self

    def _require_trained(self, action: str) -> None:
        if not self._cpu.is_trained:
            raise InputError(
                f"index {self.spec!r} must be trained before {action}: call index.train(x) first "
                "with a representative sample (e.g. at least 39 vectors per IVF cell)"
            )

    def _require_writable(self, action: str) -> None:
        lists = on_disk_lists(self._cpu)
        if lists is not None:
            raise StateError(
                f"cannot {action}: the index {self.spec!r} is read-only (its inverted lists are a memory map of "
                f"{lists.filename!r}); add the items to the embedding shards and rebuild it (metrank scale index)"
            )

    def add(self, x: Array, ids: Array | None = None) -> np.ndarray:
        """Add vectors; ``ids`` default to consecutive numbers after the largest id so far. Returns the ids."""
        x = _as_float32(x, "vectors", self.dim)
        self._require_trained("add")
        self._require_writable("add")
        if ids is None:
            ids = np.arange(self._max_id() + 1, self._max_id() + 1 + x.shape[0], dtype=np.int64)
        else:
            ids = _as_ids(ids, x.shape[0])
        try:
            self._cpu.add_with_ids(x, ids)
        except RuntimeError as err:  # e.g. a bare, non-empty index loaded from someone else's file
            raise InputError(f"index {self.spec!r} cannot store ids ({err.args[0].splitlines()[-1]})") from None
        self._next_id = max(self._max_id(), int(ids.max())) + 1
        self._gpu = None
        return ids

    def _max_id(self) -> int:
        """Largest stored id (-1 when empty); computed once from the index, then tracked by ``add``."""
        if self._next_id is None:
            self._next_id = int(self.stored_ids().max(initial=-1)) + 1
        return self._next_id - 1

    def stored_ids(self) -> np.ndarray:
        """The ids of all stored vectors (int64, in storage order)."""
        ivf = faiss.try_extract_index_ivf(self._cpu)
        if ivf is not None and ivf.invlists is not None:
            lists = ivf.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(lists.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts) if parts else np.empty(0, np.int64)
        index = faiss.downcast_index(self._cpu)
        if hasattr(index, "id_map"):
            return faiss.vector_to_array(index.id_map)
        return np.arange(self.ntotal, dtype=np.int64)

    def remove_ids(self, ids: Array) -> int:
        """Remove the given ids (unknown ids are ignored); returns how many vectors were removed."""
        self._require_writable("remove ids")
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.ascontiguousarray(np.atleast_1d(np.asarray(ids)))
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must have an integer dtype, got {ids.dtype}")
        try:
            removed = int(self._cpu.remove_ids(ids.astype(np.int64)))  # type: ignore[arg-type]
        except RuntimeError as err:
            raise InputError(
                f"index {self.spec!r} does not support removal ({err.args[0].splitlines()[-1]}); "
                "rebuild it without those vectors or use a Flat/IVF index"
            ) from None
        self._gpu = None
        return removed

    # ---- searching --------------------------------------------------------------------------------------------
    def _searcher(self, k: int) -> faiss.Index:
        ivf = faiss.try_extract_index_ivf(self._cpu)
        if not self.use_gpu or k > GPU_MAX_K or (ivf is not None and ivf.nprobe > GPU_MAX_K):
            return self._cpu  # the GPU k-selection is limited to GPU_MAX_K: the CPU master copy answers
        if self._gpu is None:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = self.gpu_mode == "shard"
            if self._gpu_resources is None:  # one StandardGpuResources per GPU, reused by every re-clone
                self._gpu_resources = [faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus())]
            try:
                self._gpu = faiss.index_cpu_to_gpu_multiple_py(self._gpu_resources, self._cpu, co=options)
            except RuntimeError as err:  # index type not implemented on GPU (HNSW, PQ, ...)
                warnings.warn(
                    f"{self.spec!r} cannot run on GPU ({err.args[0].splitlines()[-1]}); searching on CPU", stacklevel=2
                )
                self.use_gpu = False
                return self._cpu
        return self._gpu

    def search(self, q: Array, k: int, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items for each query: (scores float32 [n, k], ids int64 [n, k]), best first."""
        q = _as_float32(q, "queries", self.dim)
        k = check_positive_int(k, "k")
        self._require_trained("search")
        scores = np.empty((q.shape[0], k), np.float32)
        ids = np.empty((q.shape[0], k), np.int64)
        searcher = self._searcher(int(k))
        for start in range(0, q.shape[0], batch_size):
            stop = start + batch_size
            scores[start:stop], ids[start:stop] = searcher.search(q[start:stop], int(k))
        scores[ids < 0] = -np.inf if self.metric == "ip" else np.inf
        return scores, ids

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the (CPU) index atomically: a temporary file in the same folder, then ``os.replace``; on-disk
        inverted lists are copied to ``lists_file(path)`` first (the saved index owns them)."""
        lists = on_disk_lists(self._cpu)
        target = lists_file(path)
        if lists is not None and os.path.abspath(lists.filename) != os.path.abspath(target):
            with atomic_path(target) as tmp:
                shutil.copyfile(lists.filename, tmp)
        with atomic_path(path) as tmp:
            faiss.write_index(self._cpu, tmp)

    @classmethod
    def load(cls, path: str, device: str = "auto", gpu_mode: str = "shard", spec: str = "") -> Index:
        """The index ``save`` wrote (``spec``: its factory string, for messages; default: the FAISS class name)."""
        if not os.path.isfile(path):
            raise MissingFileError(f"no index file at {path!r}")
        index = _read_with_on_disk_lists(path) if os.path.isfile(lists_file(path)) else None
        index = faiss.read_index(path) if index is None else index
        if index.ntotal == 0 and not _stores_ids(index) and not hasattr(faiss.downcast_index(index), "id_map"):
            index = faiss.IndexIDMap2(index)
        return cls(index, spec=spec, device=device, gpu_mode=gpu_mode)

    def memory_bytes(self) -> int:
        """Size of the serialised index (vectors/codes, ids, centroids, graph), counted without copying it; the
        in-memory footprint is the same up to small allocator overheads."""
        counter = [0]
        writer = faiss.PyCallbackIOWriter(  # type: ignore[attr-defined]
            lambda chunk: counter.__setitem__(0, counter[0] + len(chunk))
        )
        faiss.write_index(self._cpu, writer)
        return counter[0]


def lists_file(path: str) -> str:
    """Where the on-disk inverted lists of the index file ``path`` live: beside it, ``index.faiss`` ->
    ``index.ivfdata``."""
    return os.path.splitext(path)[0] + LISTS_SUFFIX


def on_disk_lists(index: faiss.Index) -> Any:
    """The ``OnDiskInvertedLists`` of an IVF index whose lists are a file; ``None`` for any other index."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = None if ivf is None or ivf.invlists is None else faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _read_with_on_disk_lists(path: str) -> faiss.Index | None:
    """``path`` read without its lists, which are then mapped read-only from ``lists_file(path)`` (wherever the
    folder has moved since it was written); ``None`` when the index has no on-disk lists after all."""
    index = faiss.read_index(path, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = on_disk_lists(index)
    if lists is None:
        return None
    lists.filename = os.path.abspath(lists_file(path))
    lists.do_mmap()
    return index


def create_index(
    spec: str = "Flat",
    dim: int | None = None,
    metric: str = "ip",
    device: str = "auto",
    gpu_mode: str = "shard",
    **spec_kwargs,
) -> Index:
    """Build an empty index from a FAISS factory string or a short name (``INDEX_SPECS``: flat, ivf_flat, hnsw,
    ivf_pq; ``spec_kwargs`` such as ``nlist``/``m`` go to the short name's builder).

    >>> index = create_index("ivf_flat", dim=512, nlist=256)
    >>> index.train(x); index.add(x, ids); scores, ids = index.search(q, k=10)
    """
    if dim is None or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if spec in INDEX_SPECS:
        factory = INDEX_SPECS.create(spec, dim=int(dim), **spec_kwargs)
    elif spec_kwargs:
        raise InputError(f"options {sorted(spec_kwargs)} only apply to the short names {INDEX_SPECS.names()}")
    else:
        factory = spec
    if factory.split(",")[0].startswith("IDMap"):
        raise InputError("leave out the IDMap prefix: every index already takes 64-bit ids")
    try:
        index = faiss.index_factory(int(dim), factory, METRICS[metric])
    except RuntimeError as err:
        raise InputError(
            f"invalid index spec {spec!r}: not a short name ({', '.join(INDEX_SPECS.names())}) nor a "
            f"FAISS factory string FAISS accepts ({err.args[0].splitlines()[-1]})"
        ) from None
    if not _stores_ids(index):
        index = faiss.IndexIDMap2(index)
    return Index(index, spec=factory, device=device, gpu_mode=gpu_mode)


def _stores_ids(index: faiss.Index) -> bool:
    """Whether the index keeps 64-bit ids itself: an IVF index (its inverted lists), also behind pre-transforms --
    not behind a refine wrapper, whose exact copy has none. Every other index is wrapped in ``IndexIDMap2``."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


# ---- sizing -------------------------------------------------------------------------------------------------------
FLAT_MAX_N = 1_000_000  # exact search up to here (when it fits the budget): ~0.1-1 s per 1k queries on one CPU
MIN_POINTS_PER_CELL = 39  # FAISS's k-means warns below 39 training points per centroid
PQ_BYTES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # PQ code sizes tried, largest (most accurate) first


@dataclass
class IndexChoice:
    """The index ``choose_index`` picked: FAISS factory string, its parameters and its expected footprint.

    ``memory_bytes`` is the size of the filled index (vectors or PQ codes, 64-bit ids, IVF centroids, PQ codebooks),
    the same quantity as :meth:`Index.memory_bytes`. ``expected_recall`` is the 10-recall@10 against exact search
    measured on a sample of the user's vectors (``None`` when no sample was given); exact search has recall 1.
    """

    spec: str
    n: int
    dim: int
    memory_bytes: int
    nlist: int = 0
    pq_bytes: int = 0
    nprobe: int = 0
    expected_recall: float | None = None
    reason: str = ""

    def create(self, metric: str = "ip", device: str = "auto") -> Index:
        """An empty index of this kind (``nprobe`` set for IVF)."""
        index = create_index(self.spec, self.dim, metric=metric, device=device)
        if self.nlist:
            index.nprobe = self.nprobe
        return index

    def __str__(self) -> str:
        recall = "not measured (pass sample=...)" if self.expected_recall is None else f"{self.expected_recall:.3f}"
        probe = f", nprobe={self.nprobe}" if self.nlist else ""
        return (
            f"index {self.spec!r}{probe} for {self.n:,} x {self.dim}: expected memory "
            f"{self.memory_bytes / 2**30:.2f} GiB, expected 10-recall@10 {recall} ({self.reason})"
        )


def _ivf_nlist(n: int) -> int:
    """Power of two nearest to 4 sqrt(N) (FAISS guideline: 4-16 sqrt(N) cells), with >= 39 points per cell."""
    nlist = 2 ** int(round(np.log2(max(1.0, 4 * np.sqrt(n)))))
    while nlist > 1 and n / nlist < MIN_POINTS_PER_CELL:
        nlist //= 2
    return nlist


def index_memory(spec_kind: str, n: int, dim: int, nlist: int = 0, pq_bytes: int = 0) -> int:
    """Bytes of a filled index: ``flat`` (vectors + ids), ``ivf_flat`` (+ centroids), ``ivf_pq`` (codes, ids,
    centroids and the 256-entry codebooks of each sub-quantiser)."""
    ids = 8 * n
    if spec_kind == "flat":
        return n * dim * 4 + ids
    centroids = nlist * dim * 4
    if spec_kind == "ivf_flat":
        return n * dim * 4 + ids + centroids
    if spec_kind == "ivf_pq":
        return n * pq_bytes + ids + centroids + 256 * dim * 4
    raise InputError(f"unknown index kind {spec_kind!r}; expected 'flat', 'ivf_flat' or 'ivf_pq'")


def choose_index(
    n: int,
    dim: int,
    memory_budget: int,
    sample: Array | None = None,
    metric: str = "ip",
    flat_max_n: int = FLAT_MAX_N,
    verbose: bool = True,
    seed: int = 0,
) -> IndexChoice:
    """Pick the index for ``n`` vectors of ``dim`` within ``memory_budget`` bytes, as autofaiss does: exact ``Flat``
    below ``flat_max_n`` vectors when it fits; above, ``IVF{nlist},Flat`` when the full vectors fit, else
    ``IVF{nlist},PQ{m}`` with the largest code (``m`` bytes per vector, ``m`` dividing ``dim``) that fits. ``nlist``
    is the power of two nearest 4 sqrt(N); ``nprobe`` = nlist / 32, within [8, 256] (and at most nlist).

    With ``sample`` (vectors like the collection's, e.g. 20k of them) the recall is measured: the same kind of index
    is built on the sample with the same points per cell and probed fraction, and its 10-recall@10 against exact
    search of 500 held-out sample queries is reported. ``verbose`` prints the choice.
    """
    if not isinstance(n, (int, np.integer)) or n < 1 or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"n and dim must be positive integers, got n={n!r}, dim={dim!r}")
    if memory_budget <= 0:
        raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    n, dim = int(n), int(dim)
    flat = index_memory("flat", n, dim)
    nlist = _ivf_nlist(n)
    nprobe = min(nlist, max(8, min(256, nlist // 32)))
    if n <= flat_max_n and flat <= memory_budget:
        choice = IndexChoice("Flat", n, dim, flat, reason=f"exact search: N <= {flat_max_n:,} and it fits")
    elif index_memory("ivf_flat", n, dim, nlist) <= memory_budget:
        choice = IndexChoice(
            f"IVF{nlist},Flat", n, dim, index_memory("ivf_flat", n, dim, nlist), nlist, 0, nprobe,
            reason=f"full vectors fit; {nlist} cells = 2^round(log2(4 sqrt(N)))",
        )  # fmt: skip
    else:
        fits = [m for m in PQ_BYTES if dim % m == 0 and index_memory("ivf_pq", n, dim, nlist, m) <= memory_budget]
        if not fits:
            smallest = min(m for m in PQ_BYTES if dim % m == 0) if any(dim % m == 0 for m in PQ_BYTES) else None
            need = index_memory("ivf_pq", n, dim, nlist, smallest) if smallest else None
            raise InputError(
                f"no index for {n:,} x {dim} fits in {memory_budget / 2**30:.2f} GiB"
                + (f": the smallest IVF-PQ ({smallest} bytes/vector) needs {need / 2**30:.2f} GiB" if need else "")
                + "; raise the budget or shard the collection over machines (metrank.scale)"
            )
        m = fits[0]
        choice = IndexChoice(
            f"IVF{nlist},PQ{m}", n, dim, index_memory("ivf_pq", n, dim, nlist, m), nlist, m, nprobe,
            reason=f"{m}-byte PQ codes: the largest that fits; full vectors would need "
            f"{index_memory('ivf_flat', n, dim, nlist) / 2**30:.2f} GiB",
        )  # fmt: skip
    if sample is not None:
        choice.expected_recall = _sample_recall(choice, _as_float32(sample, "sample", dim), metric, seed)
    if verbose:
        print(choice)
    return choice


def _sample_recall(choice: IndexChoice, sample: np.ndarray, metric: str, seed: int, n_queries: int = 500) -> float:
    """10-recall@10 of ``choice``'s kind of index built on ``sample`` (scaled to the same points per cell and the
    same probed fraction of cells) against exact search, for held-out sample queries."""
    if len(sample) < n_queries + 10 * MIN_POINTS_PER_CELL:
        raise InputError(f"the sample needs at least {n_queries + 10 * MIN_POINTS_PER_CELL} vectors, got {len(sample)}")
    order = np.random.default_rng(seed).permutation(len(sample))
    queries, base = sample[order[:n_queries]], sample[order[n_queries:]]
    exact = create_index("Flat", choice.dim, metric=metric, device="cpu")
    exact.add(base)
    _, truth = exact.search(queries, 10)
    if not choice.nlist:
        return 1.0
    nlist = max(1, min(int(round(choice.nlist * len(base) / choice.n)), len(base) // MIN_POINTS_PER_CELL))
    spec = choice.spec.replace(f"IVF{choice.nlist},", f"IVF{nlist},")
    index = create_index(spec, choice.dim, metric=metric, device="cpu")
    index.nprobe = max(1, int(round(choice.nprobe * nlist / choice.nlist)))
    index.train(base)
    index.add(base)
    _, found = index.search(queries, 10)
    return float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, truth)]))
