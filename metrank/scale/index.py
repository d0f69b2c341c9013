"""Sharded IVF index build on Ray: the quantiser is trained once on a sample, shards are added in parallel Ray tasks,
the filled shard indexes are merged into one, written atomically, and marked complete last.

FAISS objects travel between processes as ``faiss.serialize_index`` bytes. The merge moves each shard's inverted
lists into the first one (``IndexIVF.merge_from``, FAISS's own in-memory merge: no re-encoding; the shards share the
trained quantiser, so the merged index equals one built in one process from the same trained index). Flat (non-IVF)
indexes are merged by adding the shards' vectors in shard order.

On disk (``out_dir``): ``index.faiss`` (the merged index, written through ``metrank.atomic``) and then
``COMPLETE.json`` (spec, dim, ntotal, shards). :func:`load_index` refuses a folder without the marker, so a killed
build is never loaded as complete; rerunning the build replaces everything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from metrank.atomic import atomic_write_text
from metrank.errors import InputError, MissingFileError, StateError
from metrank.index import Index, create_index
from metrank.scale.cluster import connect
from metrank.scale.shards import read_shard, read_shard_ids, read_shards, shard_files
from metrank.search import Retriever
from metrank.search.snapshot import resolve_model
from metrank.search.store import MODALITIES, ItemStore

INDEX_FILE = "index.faiss"
MARKER = "COMPLETE.json"


def _add_shard(trained: bytes, path: str, dim: int) -> tuple[bytes, int]:
    """Ray task: one shard's vectors added to a copy of the trained empty index; (serialised index, rows)."""
    ids, vectors, _ = read_shard(path, dim)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    index.add_with_ids(vectors, ids)
    return faiss.serialize_index(index).tobytes(), len(ids)


def build_index(
    shards: str | Sequence[str],
    out_dir: str,
    spec: str = "IVF1024,Flat",
    metric: str = "ip",
    train_size: int = 100_000,
    seed: int = 0,
    num_cpus_per_task: float = 1,
) -> Index:
    """Build one index over embedding shards (a folder from :func:`metrank.scale.embed.embed` or a list of Parquet
    files): train ``spec`` on ``train_size`` vectors sampled evenly from the shards, add every shard in its own Ray
    task, merge, and write ``out_dir`` (see the module docstring). Returns the merged index; :func:`to_retriever` serves it.

    ``InputError`` when a shard's dimension differs from the others or an id occurs twice.
    """
    ray = connect()
    files = shard_files(shards)
    ids_per_shard = [read_shard_ids(path) for path in files]
    all_ids = np.concatenate(ids_per_shard)
    unique, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"ids occur in more than one row of the shards, e.g. {unique[counts > 1][:5].tolist()}")
    rng = np.random.default_rng(seed)
    share = max(1, -(-train_size // len(files)))
    sample: list[np.ndarray] = []
    dim: int | None = None
    for path in files:
        _, vectors, _ = read_shard(path, dim)
        dim = vectors.shape[1]
        take = np.sort(rng.choice(len(vectors), min(share, len(vectors)), replace=False))
        sample.append(vectors[take])
    index = create_index(spec, int(sample[0].shape[1]), metric=metric, device="cpu")
    index.train(np.concatenate(sample), max_train=None)
    trained = ray.put(faiss.serialize_index(index._cpu).tobytes())
    task = ray.remote(num_cpus=num_cpus_per_task)(_add_shard)
    parts = ray.get([task.remote(trained, path, index.dim) for path in files])
    merged = _merge([faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)) for blob, _ in parts])
    result = Index(merged, spec=index.spec, device="cpu")
    if result.ntotal != len(all_ids):
        raise StateError(f"the merged index holds {result.ntotal} vectors, the shards {len(all_ids)}")
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # the old index is replaced: incomplete until the new marker is written
    result.save(os.path.join(out_dir, INDEX_FILE))
    info = {"spec": result.spec, "dim": index.dim, "metric": metric, "ntotal": result.ntotal, "shards": files}
    atomic_write_text(marker, json.dumps(info, indent=1))
    return result


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


def load_index(out_dir: str, device: str = "auto") -> Index:
    """The index a completed :func:`build_index` wrote; ``StateError`` for an unfinished build."""
    marker = os.path.join(out_dir, MARKER)
    if not os.path.isdir(out_dir):
        raise MissingFileError(f"no index folder at {out_dir!r}")
    if not os.path.isfile(marker):
        raise StateError(
            f"{out_dir!r} holds no finished index ({MARKER} missing: the build was interrupted or is still "
            "running); rerun metrank.scale.index.build_index"
        )
    with open(marker, encoding="utf-8") as f:
        info = json.load(f)
    index = Index.load(os.path.join(out_dir, INDEX_FILE), device=device)
    if index.ntotal != info["ntotal"] or index.dim != info["dim"]:
        raise StateError(f"{out_dir!r}: the index file does not match {MARKER}; rebuild it")
    return index


def to_retriever(out_dir: str, model: Any = None, modality: str = "vector", device: str = "auto") -> Retriever:
    """A :class:`metrank.search.Retriever` over a completed build: the merged index as its index, the shards' rows
    (ids, vectors, sources as image paths or texts) as its items; ``retriever.save(folder)`` then makes a folder
    ``metrank serve`` loads. ``model``: the model that made the embeddings (for text/image queries), or ``None``."""
    index = load_index(out_dir, device)
    with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
        info = json.load(f)
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
