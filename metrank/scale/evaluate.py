"""Sharded exact evaluation on Ray: gallery shards live in actors, queries are broadcast, rank counts are summed.

Protocol (see ``metrank.metrics``): every actor scores its shard's relevant items of each query
(``shard_relevant_items``); the driver merges them into each query's sorted relevant list
(``merge_relevant_items``) and broadcasts it; every actor counts its non-relevant items outranking each relevant
item (``shard_rank_counts``); the counts add up (``combine_rank_counts``) to the exact ranks, from which
``metrics_from_ranks`` gives the same numbers as single-process ``metrank.metrics.retrieval_metrics``. Queries go in
chunks, so the driver holds O(chunk x relevant) state and each actor only its shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metrank.errors import InputError
from metrank.metrics import (
    combine_rank_counts,
    merge_relevant_items,
    metrics_from_ranks,
    ranks_from_counts,
    shard_rank_counts,
    shard_relevant_items,
)
from metrank.scale.cluster import check_gpus, connect
from metrank.validation import check_embeddings, check_labels


class GalleryShard:
    """One gallery shard (rows ``offset ..``) and its labels, held by a Ray actor."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, offset: int, metric: str, device: str) -> None:
        self.vectors, self.labels, self.offset = vectors, labels, offset
        self.metric, self.device = metric, device

    def relevant(self, query, query_labels, query_index, limit):
        return shard_relevant_items(
            query, query_labels, self.vectors, self.labels, self.offset, query_index, self.metric, limit
        )

    def counts(self, query, relevant, query_index):
        return shard_rank_counts(query, relevant, self.vectors, self.offset, query_index, self.metric, self.device)


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery_shards: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
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
        n_shards = max(1, min(8, int(ray.cluster_resources().get("CPU", 1))))
        bounds = np.linspace(0, len(query), n_shards + 1).astype(int)
        gallery_shards = [(query[a:b], query_labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if not gallery_shards:
        raise InputError("gallery_shards is empty")
    for number, (vectors, labels) in enumerate(gallery_shards):
        check_embeddings(vectors, f"gallery shard {number}", query.shape[1])
        check_labels(labels, len(vectors), f"labels of gallery shard {number}")
    offsets = np.cumsum([0] + [len(v) for v, _ in gallery_shards])
    check_gpus(num_gpus_per_shard * len(gallery_shards))
    resources = {"num_cpus": num_cpus_per_shard, "num_gpus": num_gpus_per_shard}  # any resource given: Ray holds it
    resources = {key: value for key, value in resources.items() if value}  # ... so give none: the actor default
    remote = ray.remote(**resources)(GalleryShard) if resources else ray.remote(GalleryShard)
    actors = [
        remote.remote(np.ascontiguousarray(v, np.float32), np.asarray(lab, np.int64), int(o), metric, device)
        for (v, lab), o in zip(gallery_shards, offsets)
    ]
    limit = None if map_at_r else max(ks)
    ranks, n_relevant = [], []
    try:
        for start in range(0, len(query), query_chunk):
            q, q_labels = query[start : start + query_chunk], query_labels[start : start + query_chunk]
            own = np.arange(start, start + len(q)) if leave_one_out else None
            q_ref, own_ref = ray.put(q), ray.put(own)
            relevant = merge_relevant_items(
                ray.get([a.relevant.remote(q_ref, q_labels, own_ref, limit) for a in actors]), limit
            )
            relevant_ref = ray.put(relevant)
            counts = combine_rank_counts(ray.get([a.counts.remote(q_ref, relevant_ref, own_ref) for a in actors]))
            ranks.append(ranks_from_counts(relevant, counts))
            n_relevant.append(relevant.n_relevant)
    finally:
        for actor in actors:
            ray.kill(actor)
    width = max(r.shape[1] for r in ranks)
    all_ranks = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r in ranks])
    return metrics_from_ranks(all_ranks, np.concatenate(n_relevant), ks, map_at_r)
