"""Sharded exact evaluation on Ray: gallery shards live in actors, queries are broadcast, rank counts are summed.

Protocol (see ``metrank.metrics``): every actor scores its shard's relevant items of each query
(``shard_relevant_items``); the driver merges them into each query's sorted relevant list
(``merge_relevant_items``) and broadcasts it; every actor counts its non-relevant items outranking each relevant
item (``shard_rank_counts``); the counts add up (``combine_rank_counts``) to the exact ranks (``ranks_from_counts``).
From them ``metrics_from_ranks`` gives the same numbers as single-process ``metrank.metrics.retrieval_metrics``, and
the first-relevant ranks both ways (images against caption shards for i2t, captions against image shards for t2i)
give ``image_text_metrics_from_ranks``, the same numbers as ``metrank.metrics.image_text_metrics``. Queries go in
chunks, so the driver holds O(chunk x relevant) state and each actor only its shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from metrank.errors import InputError
from metrank.metrics import (
    combine_rank_counts,
    image_text_metrics_from_ranks,
    merge_relevant_items,
    metrics_from_ranks,
    ranks_from_counts,
    shard_rank_counts,
    shard_relevant_items,
)
from metrank.scale.cluster import check_gpus, connect
from metrank.validation import check_embeddings, check_labels, check_positive_int

Shards = Sequence[tuple[np.ndarray, np.ndarray]]


class GalleryShard:
    """One gallery shard (rows ``offset ..``) and its labels, held by a Ray actor."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, offset: int, metric: str, device: str) -> None:
        self.vectors, self.labels, self.offset = vectors, labels, offset
        self.metric, self.device = metric, device

    def relevant(self, query, query_labels, query_index, limit):
        return shard_relevant_items(
            query, query_labels, self.vectors, self.labels, self.offset, query_index, self.metric, limit
        )

    def counts(self, query, relevant, query_index, rank_cap):
        return shard_rank_counts(
            query, relevant, self.vectors, self.offset, query_index, self.metric, self.device, rank_cap
        )


def split_gallery(vectors: np.ndarray, labels: np.ndarray, n_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_shards`` contiguous, near-equal (vectors, labels) shards (fewer when there are fewer rows)."""
    bounds = np.linspace(0, len(vectors), check_positive_int(n_shards, "n_shards") + 1).astype(int)
    return [(vectors[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _default_shards(ray: ModuleType) -> int:
    """One shard per cluster CPU, at most 8."""
    return max(1, min(8, int(ray.cluster_resources().get("CPU", 1))))


@contextmanager
def _gallery_actors(
    ray: ModuleType, shards: Shards, dim: int, metric: str, device: str, num_cpus: float | None, num_gpus: float
) -> Iterator[list[Any]]:
    """One :class:`GalleryShard` actor per (vectors, labels) shard, in gallery order; killed on exit."""
    if not shards:
        raise InputError("gallery_shards is empty")
    for number, (vectors, labels) in enumerate(shards):
        check_embeddings(vectors, f"gallery shard {number}", dim)
        check_labels(labels, len(vectors), f"labels of gallery shard {number}")
    check_gpus(num_gpus * len(shards))
    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}  # any resource given: Ray holds it ...
    resources = {key: value for key, value in resources.items() if value}  # ... so give none: the actor default
    remote = ray.remote(**resources)(GalleryShard) if resources else ray.remote(GalleryShard)
    offsets = np.cumsum([0] + [len(v) for v, _ in shards])
    actors = [
        remote.remote(np.ascontiguousarray(v, np.float32), np.asarray(lab, np.int64), int(o), metric, device)
        for (v, lab), o in zip(shards, offsets)
    ]
    try:
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)


def _sharded_ranks(
    ray: ModuleType,
    actors: list[Any],
    query: np.ndarray,
    query_labels: np.ndarray,
    limit: int | None,
    query_chunk: int,
    leave_one_out: bool,
    rank_cap: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``metrank.metrics.relevant_ranks`` over the actors' shards: ``(ranks [Q, L], n_relevant [Q])``; each shard
    stops looking at entries that only outrank relevant items already past ``rank_cap`` on its own counts."""
    ranks, n_relevant = [], []
    for start in range(0, len(query), query_chunk):
        q, q_labels = query[start : start + query_chunk], query_labels[start : start + query_chunk]
        own = np.arange(start, start + len(q)) if leave_one_out else None
        q_ref, own_ref = ray.put(q), ray.put(own)
        relevant = merge_relevant_items(
            ray.get([a.relevant.remote(q_ref, q_labels, own_ref, limit) for a in actors]), limit
        )
        relevant_ref = ray.put(relevant)
        counts = combine_rank_counts(ray.get([a.counts.remote(q_ref, relevant_ref, own_ref, rank_cap) for a in actors]))
        ranks.append(ranks_from_counts(relevant, counts, rank_cap))
        n_relevant.append(relevant.n_relevant)
    width = max(r.shape[1] for r in ranks)
    all_ranks = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r in ranks])
    return all_ranks, np.concatenate(n_relevant)


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery_shards: Shards | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "ip",
    map_at_r: bool = True,
    query_chunk: int = 65536,
    num_cpus_per_shard: float | None = None,
    num_gpus_per_shard: float = 0,
    device: str = "auto",
) -> dict[str, float]:
    """``metrank.metrics.retrieval_metrics`` with the gallery split into ``gallery_shards`` ([(vectors, labels)],
    concatenated in order), each held by one Ray actor. ``gallery_shards=None`` is leave-one-out on the query set,
    which is then split into as many shards as the cluster has CPUs (at most 8). ``num_cpus_per_shard``: CPUs each
    actor holds (``None``: Ray's actor default, so more shards than CPUs still start); ``num_gpus_per_shard=1``
    puts each shard on a GPU (``device="auto"`` then scores on it)."""
    ray = connect()
    check_embeddings(query, "query")
    check_labels(query_labels, len(query), "query_labels")
    query, query_labels = np.ascontiguousarray(query, np.float32), np.asarray(query_labels, np.int64)
    leave_one_out = gallery_shards is None
    if gallery_shards is None:
        gallery_shards = split_gallery(query, query_labels, _default_shards(ray))
    limit = None if map_at_r else max(ks)
    dim = query.shape[1]
    with _gallery_actors(ray, gallery_shards, dim, metric, device, num_cpus_per_shard, num_gpus_per_shard) as actors:
        ranks, n_relevant = _sharded_ranks(
            ray, actors, query, query_labels, limit, query_chunk, leave_one_out, rank_cap=max(ks)
        )
    return metrics_from_ranks(ranks, n_relevant, ks, map_at_r)


def image_text_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image_ids: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    image_labels: np.ndarray | None = None,
    metric: str = "ip",
    n_shards: int | None = None,
    query_chunk: int = 65536,
    num_cpus_per_shard: float | None = None,
    num_gpus_per_shard: float = 0,
    device: str = "auto",
) -> dict[str, float]:
    """``metrank.metrics.image_text_metrics`` (i2t/t2i R@K, rsum, medr/meanr) with the gallery side of each
    direction split over ``n_shards`` Ray actors (default: one per cluster CPU, at most 8): caption shards answer
    the image queries (i2t), image shards the caption queries (t2i). ``text_image_ids[j]``: the image row caption j
    describes; ``image_labels``: images sharing a label are interchangeable. Resources as in
    :func:`retrieval_metrics`."""
    ray = connect()
    check_embeddings(image_emb, "image_emb")
    check_embeddings(text_emb, "text_emb", np.shape(image_emb)[1])
    check_labels(text_image_ids, len(text_emb), "text_image_ids")
    images, texts = np.ascontiguousarray(image_emb, np.float32), np.ascontiguousarray(text_emb, np.float32)
    ids = np.asarray(text_image_ids, np.int64)
    if ids.min() < 0 or ids.max() >= len(images):
        raise InputError(
            f"text_image_ids must index image_emb rows (0..{len(images) - 1}), got values in [{ids.min()}, {ids.max()}]"
        )
    if image_labels is None:
        image_labels = np.arange(len(images))
    else:
        check_labels(image_labels, len(images), "image_labels")
    image_labels = np.asarray(image_labels, np.int64)
    text_labels = image_labels[ids]
    n_shards = _default_shards(ray) if n_shards is None else n_shards
    first = []
    for query, labels, gallery, gallery_labels in (
        (images, image_labels, texts, text_labels),  # i2t: caption shards
        (texts, text_labels, images, image_labels),  # t2i: image shards
    ):
        shards = split_gallery(gallery, gallery_labels, n_shards)
        resources = (num_cpus_per_shard, num_gpus_per_shard)
        with _gallery_actors(ray, shards, images.shape[1], metric, device, *resources) as actors:
            ranks, _ = _sharded_ranks(ray, actors, query, labels, 1, query_chunk, leave_one_out=False)
        first.append(ranks[:, 0] if ranks.shape[1] else np.full(len(query), -1, np.int64))
    return image_text_metrics_from_ranks(first[0], first[1], ks)
