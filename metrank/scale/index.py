"""Sharded IVF index build on Ray: the quantiser is trained once on a sample, shards are added in parallel Ray tasks,
the filled shard indexes are merged into one, written atomically, and marked complete last.

Two merges, both FAISS's own (no re-encoding: the shards share the trained quantiser, so the merged index equals one
built in one process from the same trained index):

- in memory (default): the filled shards travel as ``faiss.serialize_index`` bytes and their inverted lists are
  moved into the first one (``IndexIVF.merge_from``); flat (non-IVF) indexes are merged by adding the shards'
  vectors in shard order. The driver holds the whole index.
- on disk (``on_disk=True``, IVF only), for indexes larger than RAM: each task writes its filled shard index to
  ``out_dir/parts/``; one merge task maps them (``IO_FLAG_MMAP``) and writes all inverted lists into one
  ``OnDiskInvertedLists`` file (``faiss.contrib.ondisk.merge_ondisk``). Every one of these tasks runs in a worker
  that exits after it, so a filled shard's heap and FAISS's maps of the parts go back to the system. Nothing holds
  more than one shard in RAM; the loaded index maps the lists read-only, so the operating system pages them in and
  out as searches touch them.

On disk (``out_dir``): ``index.faiss`` (the merged index; for an on-disk merge only the quantiser and the list
offsets) and ``index.ivfdata`` (on-disk merge: the inverted lists), each written through ``metrank.atomic``, then
``COMPLETE.json`` (spec, dim, ntotal, shards, on-disk file size, seconds per phase). :func:`load_index` refuses a
folder without the marker or whose files do not match it, so a killed build is never loaded as complete; rerunning
the build replaces everything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from metrank.atomic import atomic_path, atomic_write_text
from metrank.errors import ConfigError, InputError, MissingFileError, StateError
from metrank.index import LISTS_SUFFIX, Index, create_index, on_disk_lists
from metrank.scale.cluster import connect
from metrank.scale.shards import check_shard_dims, read_shard, read_shard_ids, read_shards, shard_files
from metrank.search import Retriever
from metrank.search.snapshot import resolve_model
from metrank.search.store import MODALITIES, ItemStore

INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index" + LISTS_SUFFIX  # beside INDEX_FILE, where Index.load maps it from
PARTS_DIR = "parts"
MARKER = "COMPLETE.json"


def _filled(trained: bytes, path: str, dim: int) -> tuple[Any, int]:
    """One shard's vectors added to a copy of the trained empty index."""
    ids, vectors, _ = read_shard(path, dim)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    index.add_with_ids(vectors, ids)
    return index, len(ids)


def _add_shard(trained: bytes, path: str, dim: int) -> tuple[bytes, int]:
    """Ray task: (serialised filled shard index, rows)."""
    index, rows = _filled(trained, path, dim)
    return faiss.serialize_index(index).tobytes(), rows


def _add_shard_to_file(trained: bytes, path: str, dim: int, part: str) -> int:
    """Ray task: the filled shard index written (atomically) to ``part``; returns its rows."""
    index, rows = _filled(trained, path, dim)
    with atomic_path(part) as tmp:
        faiss.write_index(index, tmp)
    return rows


def _merge_to_disk(trained: bytes, parts: list[str], out_dir: str) -> int:
    """Ray task: merge the part files' inverted lists into ``out_dir/index.ivfdata`` and write ``index.faiss``
    pointing at it; returns the number of vectors."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    ivfdata = os.path.abspath(os.path.join(out_dir, IVFDATA_FILE))
    with atomic_path(ivfdata) as tmp:  # a reader of an older build keeps its mapped (replaced) file
        merge_ondisk(index, parts, tmp)
        on_disk_lists(index).filename = ivfdata  # the name index.faiss records; Index.load maps the file beside it
    with atomic_path(os.path.join(out_dir, INDEX_FILE)) as tmp:
        faiss.write_index(index, tmp)
    return int(index.ntotal)


def build_index(
    shards: str | Sequence[str],
    out_dir: str,
    spec: str = "IVF1024,Flat",
    metric: str = "ip",
    train_size: int = 100_000,
    seed: int = 0,
    num_cpus_per_task: float = 1,
    on_disk: bool = False,
    trained: Index | None = None,
) -> Index:
    """Build one index over embedding shards (a folder from :func:`metrank.scale.embed.embed` or a list of Parquet
    files): train ``spec`` on ``train_size`` vectors sampled evenly from the shards, add every shard in its own Ray
    task, merge (``on_disk=True``: into ``index.ivfdata``, never holding the index in RAM; IVF specs only), and
    write ``out_dir`` (see the module docstring). On a cluster ``out_dir`` must be on storage every node sees.
    Returns the merged index (on disk: mapped from the files); :func:`to_retriever` serves it. ``COMPLETE.json``
    records the seconds spent training, adding, and merging + writing.

    ``trained``: an already trained, empty index (a previous build's quantiser, one trained elsewhere) used as is
    instead of training ``spec`` (``metric``, ``train_size`` and ``seed`` are then unused).

    ``InputError`` when a shard's dimension differs from the others (or from ``trained``), an id occurs twice, or
    ``trained`` is untrained or not empty; ``ConfigError`` for an on-disk merge of a non-IVF spec.
    """
    ray = connect()
    files = shard_files(shards)
    dim = check_shard_dims(files, None if trained is None else trained.dim)
    ids_per_shard = [read_shard_ids(path) for path in files]
    all_ids = np.concatenate(ids_per_shard)
    unique, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"ids occur in more than one row of the shards, e.g. {unique[counts > 1][:5].tolist()}")
    start = time.perf_counter()
    index = _trained_index(files, dim, spec, metric, train_size, seed, on_disk) if trained is None else trained
    if not index.is_trained or index.ntotal:
        raise InputError(f"trained must be a trained, empty index; got {index!r} with {index.ntotal} vectors")
    if on_disk:
        _check_on_disk(index._cpu, index.spec)
    seconds = {"train": time.perf_counter() - start}
    blob = ray.put(faiss.serialize_index(index._cpu).tobytes())
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # the old index is replaced: incomplete until the new marker is written
    info: dict[str, Any] = {"spec": index.spec, "dim": index.dim, "metric": index.metric, "ntotal": len(all_ids)}
    if on_disk:
        ntotal = _build_on_disk(ray, blob, files, index.dim, out_dir, num_cpus_per_task, seconds)
        _check_total(ntotal, len(all_ids))
        info["ivfdata_bytes"] = os.path.getsize(os.path.join(out_dir, IVFDATA_FILE))
    else:
        start = time.perf_counter()
        task = ray.remote(num_cpus=num_cpus_per_task)(_add_shard)
        parts = ray.get([task.remote(blob, path, index.dim) for path in files])
        seconds["add"] = time.perf_counter() - start
        merged = _merge([faiss.deserialize_index(np.frombuffer(part, dtype=np.uint8)) for part, _ in parts])
        result = Index(merged, spec=index.spec, device="cpu")
        _check_total(result.ntotal, len(all_ids))
        result.save(os.path.join(out_dir, INDEX_FILE))
        if os.path.exists(os.path.join(out_dir, IVFDATA_FILE)):
            os.remove(os.path.join(out_dir, IVFDATA_FILE))  # of an earlier on-disk build
        seconds["merge"] = time.perf_counter() - start - seconds["add"]
    info.update(on_disk=on_disk, shards=files, seconds=seconds)
    atomic_write_text(marker, json.dumps(info, indent=1))
    return load_index(out_dir, device="cpu") if on_disk else result


def _trained_index(
    files: list[str], dim: int | None, spec: str, metric: str, train_size: int, seed: int, on_disk: bool
) -> Index:
    """``spec`` trained on ``train_size`` vectors sampled evenly from the shards (read one at a time)."""
    rng = np.random.default_rng(seed)
    share = max(1, -(-train_size // len(files)))
    sample: list[np.ndarray] = []
    for path in files:
        _, vectors, _ = read_shard(path, dim)
        dim = vectors.shape[1]
        take = np.sort(rng.choice(len(vectors), min(share, len(vectors)), replace=False))
        sample.append(vectors[take])
    index = create_index(spec, int(sample[0].shape[1]), metric=metric, device="cpu")
    if on_disk:
        _check_on_disk(index._cpu, index.spec)  # before the training, which may take long
    return index.train(np.concatenate(sample), max_train=None)


def _check_total(ntotal: int, expected: int) -> None:
    if ntotal != expected:
        raise StateError(f"the merged index holds {ntotal} vectors, the shards {expected}")


def _check_on_disk(index: Any, spec: str) -> None:
    """``ConfigError`` unless ``index`` is an IVF index (optionally behind a vector transform) whose lists are all
    its data, so FAISS can keep them on disk (not IVFPQR, not a refine wrapper with its own copy of the vectors)."""
    inner: Any = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, faiss.IndexIVF) or isinstance(inner, faiss.IndexIVFPQR):
        raise ConfigError(
            f"on_disk needs an IVF index with plain inverted lists (e.g. 'IVF4096,Flat', 'OPQ64,IVF4096,PQ64'), got "
            f"{spec!r}; build it in memory (on_disk=False / no --on-disk) or pick an IVF spec"
        )


def _build_on_disk(
    ray: Any, trained: Any, files: list[str], dim: int, out_dir: str, num_cpus: float, seconds: dict[str, float]
) -> int:
    """Shards added into part files by parallel tasks, merged into ``index.ivfdata`` by one task; the parts are
    deleted afterwards. Returns the merged index's number of vectors; ``seconds`` gets the add and merge times."""
    parts_dir = os.path.join(out_dir, PARTS_DIR)
    shutil.rmtree(parts_dir, ignore_errors=True)  # of an interrupted build
    parts = [os.path.abspath(os.path.join(parts_dir, f"part-{k:05d}.faiss")) for k in range(len(files))]
    start = time.perf_counter()
    task = ray.remote(num_cpus=num_cpus, max_calls=1)(_add_shard_to_file)  # the heap of a filled shard goes too
    ray.get([task.remote(trained, path, dim, part) for path, part in zip(files, parts)])
    seconds["add"] = time.perf_counter() - start
    merge = ray.remote(num_cpus=num_cpus, max_calls=1)(_merge_to_disk)  # max_calls=1: the worker exits after it
    ntotal = ray.get(merge.remote(trained, parts, os.path.abspath(out_dir)))
    shutil.rmtree(parts_dir)
    seconds["merge"] = time.perf_counter() - start - seconds["add"]
    return ntotal


def _merge(parts: list[Any]) -> Any:
    first = parts[0]
    ivf: Any = faiss.try_extract_index_ivf(first)
    for part in parts[1:]:
        if ivf is not None:
            ivf.merge_from(faiss.try_extract_index_ivf(part), 0)
        else:
            flat: Any = faiss.downcast_index(part)
            # np.asarray: once faiss.contrib.torch_utils is imported (PML does), reconstruct_n returns a tensor
            vectors = np.asarray(flat.index.reconstruct_n(0, flat.ntotal), dtype=np.float32)
            first.add_with_ids(vectors, faiss.vector_to_array(flat.id_map))
    if ivf is not None:
        first.ntotal = ivf.ntotal
    return first


def _read_info(out_dir: str) -> dict[str, Any]:
    """The completion marker of a finished build; ``StateError`` for an unfinished one."""
    if not os.path.isdir(out_dir):
        raise MissingFileError(f"no index folder at {out_dir!r}")
    marker = os.path.join(out_dir, MARKER)
    if not os.path.isfile(marker):
        raise StateError(
            f"{out_dir!r} holds no finished index ({MARKER} missing: the build was interrupted or is still "
            "running); rerun metrank.scale.index.build_index"
        )
    with open(marker, encoding="utf-8") as f:
        return json.load(f)


def load_index(out_dir: str, device: str = "auto") -> Index:
    """The index a completed :func:`build_index` wrote (on-disk merge: read-only, its lists mapped from
    ``index.ivfdata``); ``StateError`` for an unfinished build."""
    info = _read_info(out_dir)
    ivfdata = os.path.join(out_dir, IVFDATA_FILE)
    if info.get("on_disk") and (not os.path.isfile(ivfdata) or os.path.getsize(ivfdata) != info["ivfdata_bytes"]):
        raise StateError(f"{os.path.abspath(ivfdata)!r} is missing or not the file {MARKER} describes; rebuild it")
    index = Index.load(os.path.join(out_dir, INDEX_FILE), device=device, spec=info["spec"])
    if index.ntotal != info["ntotal"] or index.dim != info["dim"]:
        raise StateError(f"{out_dir!r}: the index file does not match {MARKER}; rebuild it")
    return index


def to_retriever(out_dir: str, model: Any = None, modality: str = "vector", device: str = "auto") -> Retriever:
    """A :class:`metrank.search.Retriever` over a completed build: the merged index as its index, the shards' rows
    (ids, vectors, sources as image paths or texts) as its items; ``retriever.save(folder)`` then makes a folder
    ``metrank serve`` loads (from an on-disk build: read-only, with its own copy of ``index.ivfdata``, so the build
    folder may go). ``model``: the model that made the embeddings (for text/image queries), or ``None``."""
    index = load_index(out_dir, device)
    info = _read_info(out_dir)
    ids, vectors, sources = read_shards(info["shards"])
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
    model_object, reference = resolve_model(model)
    store = ItemStore(index.dim)
    with store.transaction():
        store.insert(
            ids, modality, vectors, ["{}"] * len(ids),
            paths=sources if modality == "image" else None, texts=sources if modality == "text" else None,
        )  # fmt: skip
        store.set_info("next_id", int(ids.max()) + 1)
    return Retriever(index, store, reference, info["spec"], model=model_object)
