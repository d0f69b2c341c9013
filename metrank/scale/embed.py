"""Batch embedding on Ray Data: items -> an actor pool (one model per actor) -> resumable Parquet shards.

The driver lists the items (``metrank.search.sources.read_items``: an image folder, CSV/JSONL rows, a .txt file;
Parquet via ``pyarrow``) and cuts them into shards of ``shard_size`` consecutive items (item i gets id i). Shards
whose file exists already are skipped (a rerun resumes an interrupted job). The rest become one Ray Dataset row
each; ``map_batches`` runs :class:`ShardEmbedder` (a callable class: the model is built once per actor; its weights
travel once through the object store) on an actor pool of ``num_workers`` (``compute=ActorPoolStrategy(size=N)``:
``concurrency=`` is deprecated since Ray 2.51), with ``num_gpus=1`` per actor when ``use_gpu``. Each actor embeds
its shard with the model's own ``embed_images``/``embed_texts`` (the same preprocessing as in-process embedding, so
the numbers are identical) and writes ``shard-NNNNN.parquet`` atomically to ``out_dir`` (on a real cluster a shared
file system). ``manifest.json`` is written last, when every shard exists.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from metrank.atomic import atomic_write_text
from metrank.encoders import create_model, load_checkpoint
from metrank.errors import InputError
from metrank.scale.cluster import check_gpus, connect
from metrank.scale.shards import SHARD_PATTERN, write_shard
from metrank.search.sources import IMAGE_COLUMNS, TEXT_COLUMNS, read_items

MANIFEST = "manifest.json"


def list_items(source: str, kind: str) -> list[str]:
    """Image paths or texts of ``source``: whatever ``read_items`` reads, plus Parquet tables with an
    image/path/file or text/caption/name column."""
    if source.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        names = pq.read_schema(source).names
        columns = IMAGE_COLUMNS if kind == "image" else TEXT_COLUMNS
        column = next((c for c in columns if c in names), None)
        if column is None:
            raise InputError(f"{source!r} needs a column named one of {columns} for {kind}s; it has {names}")
        values = [str(v) for v in pq.read_table(source, columns=[column]).column(column).to_pylist()]
        base = os.path.dirname(os.path.abspath(source))
        return [os.path.join(base, v) for v in values] if kind == "image" else values
    items = read_items(source, kind)
    return list(items.images or items.texts or [])


class ShardEmbedder:
    """Ray Data callable class: builds the model once per actor; each call embeds whole shards and writes them."""

    def __init__(self, model: Any, kind: str, out_dir: str, batch_size: int, device: str) -> None:
        import ray
        import torch

        if isinstance(model, ray.ObjectRef):  # the weights travel once through the object store
            model = ray.get(model)
        self.model = model.to(torch.device(device))
        self.kind, self.out_dir, self.batch_size = kind, out_dir, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for shard, start, sources in zip(batch["shard"], batch["start"], batch["sources"]):
            sources = [str(s) for s in sources]
            embed = self.model.embed_images if self.kind == "image" else self.model.embed_texts
            vectors = embed(sources, batch_size=self.batch_size, progress=False)
            ids = np.arange(int(start), int(start) + len(sources), dtype=np.int64)
            write_shard(os.path.join(self.out_dir, SHARD_PATTERN.format(int(shard))), ids, vectors, sources)
            rows.append(len(sources))
        return {"shard": np.asarray(batch["shard"]), "rows": np.asarray(rows)}


def embed(
    source: str,
    out_dir: str,
    model: Any,
    kind: str = "image",
    num_workers: int = 1,
    use_gpu: bool = False,
    shard_size: int = 10_000,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed every item of ``source`` into Parquet shards under ``out_dir`` (see the module docstring); returns the
    manifest (``n_items``, ``dim``, ``shards``, ``skipped``: shards found finished and not recomputed).

    ``model``: a ``RetrievalModel``, a model name or a checkpoint path (``metrank.encoders.load_checkpoint``); the
    driver builds it once and ships its weights to the actors, so every actor embeds with the same weights.
    """

    if kind not in ("image", "text"):
        raise InputError(f"kind must be 'image' or 'text', got {kind!r}")
    if num_workers < 1 or shard_size < 1:
        raise InputError(f"num_workers and shard_size must be >= 1, got {num_workers} and {shard_size}")
    ray = connect()
    if use_gpu:
        check_gpus(num_workers)
    if isinstance(model, str):
        model = load_checkpoint(model) if os.path.isfile(model) else create_model(model)
    sources = list_items(source, kind)
    os.makedirs(out_dir, exist_ok=True)
    starts = range(0, len(sources), shard_size)
    todo: list[dict[str, Any]] = [
        {"shard": k, "start": start, "sources": sources[start : start + shard_size]}
        for k, start in enumerate(starts)
        if not os.path.isfile(os.path.join(out_dir, SHARD_PATTERN.format(k)))
    ]
    if todo:
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
        done = dataset.map_batches(
            ShardEmbedder,
            fn_constructor_kwargs=dict(
                model=ray.put(model.cpu()), kind=kind, out_dir=os.path.abspath(out_dir), batch_size=batch_size,
                device="cuda" if use_gpu else "cpu",
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_gpus=1 if use_gpu else 0,
        )  # fmt: skip
        finished = sum(int(n) for n in done.to_pandas()["rows"])
        if finished != sum(len(t["sources"]) for t in todo):
            raise InputError(
                f"the embedding job wrote {finished} rows for {sum(len(t['sources']) for t in todo)} items"
            )
    manifest = {
        "n_items": len(sources),
        "dim": int(model.embed_dim),
        "kind": kind,
        "shards": [SHARD_PATTERN.format(k) for k in range(len(starts))],
        "skipped": len(starts) - len(todo),
    }
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    return manifest
