"""Exact retrieval metrics by rank counting (no k limit, shard-additive), and exact k-NN.

Ranking rule (used everywhere here): gallery items are ordered by score, best first (inner product for
``metric="ip"``, smallest squared L2 distance for ``metric="l2"``); **among equal scores the lower gallery index ranks
first**. Results therefore equal a brute-force ``np.lexsort((index, -score))`` reference exactly, ties included.

Rank counting: every metric below needs only r_p, the 0-based rank of each relevant item p of a query = the number of
gallery items that outrank p. With p the position of the item among the query's relevant items (in ranking order),
r_p = p + (non-relevant items outranking it). So (1) each query's relevant items are scored exactly (float64 from
the float32 inputs) and sorted (``shard_relevant_items`` / ``merge_relevant_items``: O(queries x relevant) state);
(2) blocked float32 GEMM tiles of queries x gallery are scanned once: entries at or above the query's lowest
relevant score are counted against its sorted relevant scores (``shard_rank_counts``). An entry whose tile score
lies within the GEMM rounding bound ``2 (d + 4) u |q| |g|`` of a relevant score (u = 2^-24; a near-tie or an
identical vector, which BLAS may round differently depending on its column) is rescored exactly, so identical
vectors tie and the tie rule holds. No top-k list is built, so any K works (K > gallery included), and the counts of
disjoint gallery shards add up (``combine_rank_counts``) -- the basis of ``metrank.scale``'s sharded evaluation.
From the ranks: R@K = [r_0 < K], P@K = #{p: r_p < K} / K, MAP@R = (1/R) sum_{r_p < R} (p + 1) / (r_p + 1),
R-precision = #{p: r_p < R} / R, medr/meanr from r_0.

Two things keep the scan near the GEMM rate. A rank cap (``rank_caps``: R@K/P@K need ranks only below max K, MAP@R
only below R): once a relevant item is known to rank at or beyond the cap, the query's bound rises to the next item,
so a query costs O(cap) candidates, not O(rank of its deepest relevant item); the first tiles are narrow so bounds
rise early, and a tile is read through group maxima, entry by entry only where a group reaches the bound. And
leave-one-out (query set = gallery) scores each tile of the symmetric x x^T once, counting it for its rows and,
transposed, for its columns: half the GEMM work.

``knn`` (exact, tie-stable top-k lists) uses an exact FAISS flat index (GPU when present) for the ``k + 1`` best
items of each query, re-sorts equal-score runs by index, recomputes rows with a tie across the cut against the whole
gallery, and indexes bit-identical gallery vectors once (BLAS rounds one dot product differently depending on the
column's place in the matrix, which would otherwise split such duplicates).

Class-label retrieval (``retrieval_metrics``; Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):

- ``R@K`` (Recall@K in the metric-learning sense): 1 if any of the top K items shares the query's label.
- ``P@K``: (relevant items among the top K) / K.
- ``MAP@R``: with R = number of gallery items sharing the query's label, ``(1/R) sum_{i<=R} P@i * rel(i)``.
- ``R-precision``: (relevant items among the top R) / R.

With ``gallery=None`` the query set is its own gallery and each query's own row is left out (CUB/Cars/SOP protocol);
otherwise query and gallery are separate (In-Shop). Queries with no relevant gallery item (a class of size 1 in the
leave-one-out case) are excluded from every mean and counted in ``n_queries_no_relevant`` -- the same rule as
pytorch-metric-learning's ``AccuracyCalculator`` ("lone" query labels). Values are fractions in [0, 1].

Image-text retrieval (``image_text_metrics``; VSE++ protocol, Faghri et al. 2018): i2t -- an image query hits at K
if any of its captions is in the top K; t2i -- a caption hits if its image is in the top K. Recalls are percentages,
``rsum`` is the sum of the six (max 600), ``medr``/``meanr`` are the median (floored) / mean 1-based rank of the
first correct item. ``coco_1k_folds`` averages the metrics over five 1K-image folds (COCO 1K).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from metrank.distributed import resolve_device
from metrank.errors import InputError
from metrank.index import _as_float32, create_index
from metrank.validation import check_labels, check_positive_int

Array = np.ndarray | torch.Tensor
ELEMENTS_PER_CHUNK = 1 << 25  # cap on chunk x gallery (or chunk x k) entries held at once


def _labels(labels: Array, n: int, name: str) -> np.ndarray:
    check_labels(labels, n, name)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def _check_metric(metric: str) -> None:
    if metric not in ("ip", "l2"):
        raise InputError(f"metric must be 'ip' (inner product) or 'l2' (squared Euclidean), got {metric!r}")


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    return ks


def _first_identical_row(x: np.ndarray) -> np.ndarray | None:
    """``canonical[i]`` = the lowest index of a row bit-identical to row i (-0.0 counted as 0.0); ``None`` when all
    rows differ. A 64-bit hash per row finds candidates; candidates are then compared byte for byte."""
    n, d = x.shape
    weights = np.random.default_rng(0).integers(1, 1 << 62, d, dtype=np.int64) | 1
    hashes = np.empty(n, np.int64)
    for start in range(0, n, 16384):
        bits = (x[start : start + 16384] + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into 0.0
        hashes[start : start + 16384] = (bits.astype(np.int64) * weights).sum(1)  # wraps around: a hash
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    suspects = np.flatnonzero(counts[inverse.ravel()] > 1)
    if not len(suspects):
        return None
    rows = np.ascontiguousarray(x[suspects] + np.float32(0)).view(np.dtype((np.void, 4 * d))).ravel()
    _, first, group = np.unique(rows, return_index=True, return_inverse=True)
    canonical = np.arange(n)
    canonical[suspects] = suspects[first[group.ravel()]]
    return None if (canonical[suspects] == suspects).all() else canonical


class GalleryScorer:
    """Whole-gallery scores (higher is better: inner products, or negated squared L2 distances) for query chunks.

    Identical gallery vectors get bit-identical scores: BLAS kernels may round the same dot product differently
    depending on where a column falls in the matrix, so each distinct vector is scored once and its score is copied
    to all its duplicates (which then tie, and rank by index).
    """

    def __init__(self, gallery: np.ndarray, metric: str = "ip", device: str = "auto") -> None:
        self.metric = metric
        self.n = len(gallery)
        canonical = _first_identical_row(gallery)
        if canonical is None:
            self.distinct_rows, self.slot = np.arange(self.n), None
        else:
            self.distinct_rows = np.flatnonzero(canonical == np.arange(self.n))
            self.slot = np.searchsorted(self.distinct_rows, canonical)  # distinct vector of each gallery row
        self.vectors = gallery if self.slot is None else gallery[self.distinct_rows]
        self.device = resolve_device(device)
        self._vectors: torch.Tensor | None = None

    def __call__(self, q: np.ndarray) -> torch.Tensor:
        if self._vectors is None:  # made on first use: most evaluations never rescore
            self._vectors = torch.from_numpy(self.vectors).to(self.device)
            self._sq_norms = (self._vectors * self._vectors).sum(1) if self.metric == "l2" else None
            self._slot = None if self.slot is None else torch.from_numpy(self.slot).to(self.device)
        qt = torch.from_numpy(q).to(self.device)
        s = qt @ self._vectors.T
        if self._sq_norms is not None:
            s = 2 * s - self._sq_norms[None, :] - (qt * qt).sum(1, keepdim=True)
        return s if self._slot is None else s[:, self._slot]


def _topk_tie_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row (higher first; equal scores: lower column first) of a [rows, n] matrix, k <= n."""
    threshold = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > threshold
    at = scores == threshold
    still_needed = k - above.sum(1, keepdim=True)
    selected = above | (at & (torch.cumsum(at, dim=1) <= still_needed))
    cols = selected.nonzero()[:, 1].view(-1, k)  # ascending column order within each row
    vals = torch.gather(scores, 1, cols)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(cols, 1, order)


def _sort_ties_by_index(scores: np.ndarray, ids: np.ndarray) -> None:
    """In place: rows already sorted by score get equal-score runs ordered by ascending id."""
    tied = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(1)) if scores.shape[1] > 1 else np.empty(0, np.int64)
    if len(tied):
        s, i = scores[tied], ids[tied]
        by_id = np.argsort(i, axis=1, kind="stable")
        s, i = np.take_along_axis(s, by_id, 1), np.take_along_axis(i, by_id, 1)
        by_score = np.argsort(-s, axis=1, kind="stable")
        scores[tied], ids[tied] = np.take_along_axis(s, by_score, 1), np.take_along_axis(i, by_score, 1)


class ExactKNN:
    """Exact, tie-stable k-NN of query chunks against a fixed gallery (see the module docstring).

    The FAISS index holds each distinct gallery vector once (``GalleryScorer``); a hit on a vector stands for all
    its identical copies, which are expanded back in index order.
    """

    def __init__(self, gallery: Array, metric: str = "ip", device: str = "auto") -> None:
        self.gallery = _as_float32(gallery, "gallery")
        self.metric = metric
        self.scorer = GalleryScorer(self.gallery, metric, device)
        self.index = create_index("Flat", self.gallery.shape[1], metric=metric, device=device)
        self.index.add(self.scorer.vectors)
        if self.scorer.slot is not None:
            self.members = np.argsort(self.scorer.slot, kind="stable")  # gallery rows grouped by distinct vector
            self.group_size = np.bincount(self.scorer.slot)
            self.group_start = np.cumsum(self.group_size) - self.group_size

    def __len__(self) -> int:
        return self.gallery.shape[0]

    def search(self, q: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores where higher is better, gallery rows) of each row of ``q``; ``self_ids[i]`` (if given) is a
        gallery row that query i must skip. Slots beyond the available items hold row -1, score -inf."""
        width = k + 1 + int(self_ids is not None)  # enough to see one item past the cut once self is skipped
        scores, ids = self.index.search(q, min(width, self.index.ntotal))
        if self.metric == "l2":
            scores = -scores
        if self.scorer.slot is not None:
            scores, ids = self._expand_duplicates(scores, ids, width)
        if self_ids is not None:
            is_self = ids == self_ids[:, None]
            scores[is_self], ids[is_self] = -np.inf, -1
            order = np.argsort(ids < 0, axis=1, kind="stable")  # empty slots to the end, order kept otherwise
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        cut_ties = (
            np.flatnonzero((ids[:, k] >= 0) & (scores[:, k - 1] == scores[:, k]))
            if ids.shape[1] > k
            else np.empty(0, np.int64)
        )
        scores, ids = np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])
        _sort_ties_by_index(scores, ids)
        if len(cut_ties):
            scores[cut_ties], ids[cut_ties] = self._rescore(
                q[cut_ties], k, None if self_ids is None else self_ids[cut_ties]
            )
        if scores.shape[1] < k:  # fewer than k items exist
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def _expand_duplicates(self, scores: np.ndarray, slots: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Replace each hit on a distinct vector by its gallery rows (ascending), keeping ``width`` per query."""
        n = len(slots)
        counts = np.minimum(self.group_size[slots], width).ravel()
        totals = counts.reshape(n, -1).sum(1)
        offset_in_group = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = self.members[np.repeat(self.group_start[slots.ravel()], counts) + offset_in_group]
        query = np.repeat(np.arange(n), totals)
        column = np.arange(len(query)) - np.repeat(np.cumsum(totals) - totals, totals)
        keep = column < width
        out_scores, out_ids = np.full((n, width), -np.inf, np.float32), np.full((n, width), -1, np.int64)
        out_scores[query[keep], column[keep]] = np.repeat(scores.ravel(), counts)[keep]
        out_ids[query[keep], column[keep]] = rows[keep]
        return out_scores, out_ids

    def _rescore(self, q: np.ndarray, k: int, self_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Whole-gallery tie-exact top-k for a few rows (those with a tie across the cut)."""
        out_scores, out_ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        rows = max(1, ELEMENTS_PER_CHUNK // len(self))
        for start in range(0, len(q), rows):
            s = self.scorer(q[start : start + rows])
            if self_ids is not None:
                s[torch.arange(len(s)), torch.from_numpy(self_ids[start : start + rows]).to(s.device)] = -torch.inf
            vals, cols = _topk_tie_stable(s, k)
            out_scores[start : start + rows], out_ids[start : start + rows] = vals.cpu().numpy(), cols.cpu().numpy()
        return out_scores, out_ids


def _chunks(n: int, chunk_size: int, progress: bool | None, desc: str) -> Iterator[slice]:
    starts = range(0, n, chunk_size)
    disable = True if len(starts) <= 1 else (None if progress is None else not progress)  # None: only on a tty
    for start in tqdm(starts, desc=desc, disable=disable, leave=False):
        yield slice(start, min(start + chunk_size, n))


def knn(
    query: Array,
    gallery: Array | None = None,
    k: int = 10,
    metric: str = "ip",
    device: str = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact, tie-stable k-NN: (scores float32 [n, k], gallery row ids int64 [n, k]), best first, -1 padded.

    ``gallery=None`` searches the query set against itself, leaving each query's own row out. Scores are inner
    products (``ip``) or squared L2 distances (``l2``).
    """
    query = _as_float32(query, "query")
    k = check_positive_int(k, "k")
    _check_metric(metric)
    leave_one_out = gallery is None
    engine = ExactKNN(query if gallery is None else _check_gallery(gallery, query.shape[1]), metric, device)
    chunk_size = chunk_size or max(256, min(8192, ELEMENTS_PER_CHUNK // k))
    scores = np.empty((len(query), k), np.float32)
    ids = np.empty((len(query), k), np.int64)
    for rows in _chunks(len(query), chunk_size, progress, "knn"):
        self_ids = np.arange(rows.start, rows.stop) if leave_one_out else None
        scores[rows], ids[rows] = engine.search(query[rows], int(k), self_ids)
    return (scores if metric == "ip" else -scores), ids


def _check_gallery(gallery: Array, dim: int) -> np.ndarray:
    gallery = _as_float32(gallery, "gallery")
    if gallery.shape[1] != dim:
        raise InputError(f"gallery has dimension {gallery.shape[1]} but the queries have {dim}")
    return gallery


# ---- rank counting ----------------------------------------------------------------------------------------------
ROUNDING = 2.0**-24  # unit roundoff of float32
TILE_COLUMNS = 8192  # gallery columns per score tile
TILE_ROWS = 1024  # queries per score tile (fewer when queries have many relevant items)
GROUP = 64  # entries per group maximum in the scan of a score tile
DIRECT_WIDTH = 8  # up to this many relevant items per query, candidates are compared with each (else binary search)


@dataclass
class RelevantItems:
    """The relevant gallery items of each query in ranking order -- score descending, then gallery index ascending --
    which the rank counts are taken against.

    ``scores`` (float64 [Q, L]) are dot products (``ip``) or negated squared distances (``l2``) computed in float64
    from the float32 inputs, so identical vectors score identically; unused slots hold score +inf and index -1.
    ``n_relevant`` [Q] counts all relevant items of each query, also those cut off by a ``limit``.
    """

    scores: np.ndarray
    index: np.ndarray
    n_relevant: np.ndarray

    @property
    def n_kept(self) -> np.ndarray:
        """Relevant items held per query (``min(n_relevant, L)``)."""
        return (self.index >= 0).sum(1)


def _exact_scores(query: np.ndarray, q_rows: np.ndarray, gallery: np.ndarray, g_rows: np.ndarray, metric: str):
    """float64 scores of the row pairs (query[q_rows[i]], gallery[g_rows[i]]) -- or of query[q_rows[i]] with each
    gallery[g_rows[i, j]] when ``g_rows`` is [n, w]. Products of float32 numbers are exact in float64 and every pair
    is summed in the same order wherever it sits (numpy's reduction over a contiguous last axis of length d), so
    identical vectors score identically (unlike a BLAS tile). Gathers in chunks that stay in cache."""
    out = np.empty(g_rows.shape, np.float64)
    step = max(1, (1 << 16) // max(1, query.shape[1] * int(np.prod(g_rows.shape[1:]))))
    for start in range(0, len(q_rows), step):
        a = query[q_rows[start : start + step]].astype(np.float64)
        b = gallery[g_rows[start : start + step]].astype(np.float64)
        if b.ndim == 3:
            a = a[:, None, :]
        if metric == "ip":
            b *= a
            out[start : start + step] = b.sum(-1)
        else:
            b -= a
            b *= b
            out[start : start + step] = -b.sum(-1)
    return out


def _query_index(query_index: Array | None, n: int) -> np.ndarray:
    if query_index is None:
        return np.full(n, -1, np.int64)
    out = np.asarray(query_index, dtype=np.int64)
    if out.shape != (n,):
        raise InputError(f"query_index must hold one gallery index (or -1) per query ({n}), got shape {out.shape}")
    return out


def shard_relevant_items(
    query: Array,
    query_labels: Array,
    shard: Array,
    shard_labels: Array,
    offset: int = 0,
    query_index: Array | None = None,
    metric: str = "ip",
    limit: int | None = None,
) -> RelevantItems:
    """The relevant items (same label) a gallery shard holds for each query, scored exactly and sorted.

    The shard holds gallery rows ``offset .. offset + len(shard) - 1``; ``query_index[i]`` is the gallery row that is
    query i itself (left out; -1: none). ``limit`` keeps each query's best ``limit`` items. Merge the shards' results
    with :func:`merge_relevant_items`.
    """
    query, shard = _as_float32(query, "query"), _check_gallery(shard, np.shape(query)[1])
    query_labels = _labels(query_labels, len(query), "query_labels")
    shard_labels = _labels(shard_labels, len(shard), "shard_labels")
    _check_metric(metric)
    self_rows = _query_index(query_index, len(query)) - offset
    order = np.argsort(shard_labels, kind="stable")  # each label's rows in ascending order
    lo = np.searchsorted(shard_labels[order], query_labels, "left")
    n = np.searchsorted(shard_labels[order], query_labels, "right") - lo
    width = int(n.max(initial=0))
    slot = np.arange(width)[None, :]
    valid = slot < n[:, None]
    rows = np.where(valid, order[np.minimum(lo[:, None] + slot, max(len(shard) - 1, 0))], -1)
    valid &= rows != self_rows[:, None]
    scores = _exact_scores(query, np.arange(len(query)), shard, np.maximum(rows, 0), metric)
    index = np.where(valid, rows + offset, -1)
    items = RelevantItems(np.where(valid, scores, np.inf), index, valid.sum(1))
    return merge_relevant_items([items], limit)


def merge_relevant_items(parts: Sequence[RelevantItems], limit: int | None = None) -> RelevantItems:
    """Merge per-shard :class:`RelevantItems` of the same queries into one, in ranking order, keeping at most
    ``limit`` items per query (all when ``None``)."""
    if not parts:
        raise InputError("merge_relevant_items needs at least one part")
    if len({len(p.n_relevant) for p in parts}) != 1:
        raise InputError(f"parts hold different numbers of queries: {[len(p.n_relevant) for p in parts]}")
    scores = np.concatenate([p.scores for p in parts], 1)
    index = np.concatenate([p.index for p in parts], 1)
    unused = index < 0
    order = np.lexsort((index, -np.where(unused, -np.inf, scores), unused), axis=1)
    width = int((~unused).sum(1).max(initial=0))
    width = width if limit is None else min(width, int(limit))
    order = order[:, :width]
    return RelevantItems(
        np.take_along_axis(scores, order, 1),
        np.take_along_axis(index, order, 1),
        np.sum([p.n_relevant for p in parts], axis=0),
    )


def _float32_bounds(t: np.ndarray, slack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(lo, hi)`` with ``lo <= t - slack`` and ``hi >= t + slack`` (+inf stays +inf)."""
    inf = np.float32(np.inf)
    with np.errstate(invalid="ignore"):
        lo = np.nextafter((t - slack).astype(np.float32), -inf)
        hi = np.nextafter((t + slack).astype(np.float32), inf)
    return np.where(np.isinf(t), inf, lo), np.where(np.isinf(t), inf, hi)


def rank_caps(relevant: RelevantItems, rank_cap: int | None) -> np.ndarray | None:
    """Each query's rank cap: ``max(rank_cap, its kept relevant items)`` (``None``: no cap). Ranks at or beyond the
    cap are reported as the cap; R@K and P@K for K <= ``rank_cap``, MAP@R and R-precision need no more."""
    return None if rank_cap is None else np.maximum(check_positive_int(rank_cap, "rank_cap"), relevant.n_kept)


def shard_rank_counts(
    query: Array,
    relevant: RelevantItems,
    shard: Array,
    offset: int = 0,
    query_index: Array | None = None,
    metric: str = "ip",
    device: str = "auto",
    rank_cap: int | None = None,
) -> np.ndarray:
    """Per-shard rank counts: ``counts[i, p]`` (int64 [Q, L]) = how many items of this gallery shard that are not
    query i's relevant items (nor query i itself) outrank its p-th relevant item (``relevant``: the merged
    :class:`RelevantItems` of the whole gallery; the shard holds gallery rows ``offset ..``).

    Counts of disjoint shards add up (:func:`combine_rank_counts`); :func:`ranks_from_counts` turns the total into
    ranks. Scores come from float32 GEMM tiles and only entries at or above the query's lowest kept relevant score
    are looked at. An entry whose tile score lies within the GEMM rounding bound of a relevant score (a near-tie, an
    identical vector) is rescored exactly (float64) and ties go to the lower gallery index, so the counts are exact.
    Relevant items cut off by a ``limit`` never outrank a kept one, so they need no exclusion.

    ``rank_cap`` (see :func:`rank_caps`): once a relevant item is known to rank at or beyond its query's cap, entries
    that outrank only such items are no longer looked at -- the bound rises to the lowest item still below the cap --
    so a query costs O(cap) candidates instead of O(rank of its lowest relevant item). The count of such an item is
    then a lower bound that still reaches the cap; ``ranks_from_counts(..., rank_cap)`` clips it, and the clipped
    ranks stay additive over shards.
    """
    query, shard = _as_float32(query, "query"), _check_gallery(shard, np.shape(query)[1])
    _check_metric(metric)
    if len(relevant.n_relevant) != len(query):
        raise InputError(f"relevant items are for {len(relevant.n_relevant)} queries, got {len(query)} queries")
    self_index = _query_index(query_index, len(query))
    counter = _RankCounter(query, relevant, shard, offset, self_index, metric, device, rank_cap)
    todo = np.flatnonzero(relevant.n_kept > 0)
    for start in range(0, len(todo), counter.block_rows):
        counter.scan(todo[start : start + counter.block_rows])
    return counter.counts


def _leave_one_out_counts(
    x: np.ndarray, relevant: RelevantItems, metric: str, device: str, rank_cap: int | None, progress: bool | None
) -> np.ndarray:
    """``shard_rank_counts`` of the set ``x`` against itself (query i is gallery row i), computing each tile of the
    symmetric score matrix once: tile (rows I, columns J past I) counts for the rows I as it is and, transposed, for
    the rows J. Half the GEMM work of the general path; the same counts."""
    counter = _RankCounter(x, relevant, x, 0, np.arange(len(x)), metric, device, rank_cap, symmetric=True)
    for rows in _chunks(len(x), counter.block_rows, progress, "rank counts"):
        counter.scan(np.arange(rows.start, rows.stop))
    return counter.counts


class _RankCounter:
    """The rank counting of :func:`shard_rank_counts` against one gallery shard, a block of query rows at a time;
    holds the running counts of all queries (see there)."""

    def __init__(
        self,
        query: np.ndarray,
        relevant: RelevantItems,
        shard: np.ndarray,
        offset: int,
        self_index: np.ndarray,
        metric: str,
        device: str,
        rank_cap: int | None,
        symmetric: bool = False,
    ) -> None:
        self.query, self.relevant, self.shard, self.metric, self.symmetric = query, relevant, shard, metric, symmetric
        self.offset = offset
        n_q, width = relevant.index.shape
        self.block_rows = max(1, min(TILE_ROWS, (1 << 22) // max(width, 1)))
        d = query.shape[1]
        q_norm = np.sqrt(np.einsum("ij,ij->i", query, query, dtype=np.float64))
        g_norm = float(np.sqrt(np.einsum("ij,ij->i", shard, shard, dtype=np.float64).max(initial=0)))
        slack = 2 * (d + 4) * ROUNDING * (q_norm * g_norm if metric == "ip" else (q_norm + g_norm) ** 2)
        self.lo, self.hi = _float32_bounds(relevant.scores, slack[:, None])
        # entries that never count: the kept relevant items and the query itself (as shard rows)
        self.skip = np.concatenate([relevant.index, self_index[:, None]], 1) - offset
        self.kept = relevant.n_kept
        self.held = np.arange(width)[None, :] < self.kept[:, None]
        if width > DIRECT_WIDTH:
            # each query's kept relevant bounds as sorted (query, value) keys: counting the bounds below a candidate is
            # one binary search, O(log L) per candidate however many relevant items a query has
            query_of = np.broadcast_to(np.arange(n_q)[:, None], self.held.shape)[self.held]
            self.hi_keys = np.sort(_row_keys(query_of, self.hi[self.held]))
            self.lo_keys = np.sort(_row_keys(query_of, self.lo[self.held]))
            self.first = np.cumsum(self.kept) - self.kept
        self.counts = np.zeros((n_q, width), np.int64)
        self.caps = rank_caps(relevant, rank_cap)
        self.below_cap = self.kept.copy()  # relevant items (a prefix) not yet known to rank at or beyond the cap
        self.device = resolve_device(device)
        self.g = torch.from_numpy(shard).to(self.device)
        self.g_sq = (self.g * self.g).sum(1) if metric == "l2" else None
        self.tile = torch.empty(0, device=self.device)  # reused: no page faults per tile

    def scan(self, rows: np.ndarray) -> None:
        """Count the shard's columns for the query rows ``rows``. Symmetric: ``rows`` are consecutive, only the columns
        from ``rows[0]`` on are scored, and those past ``rows[-1]`` count for their own rows too, transposed."""
        q = torch.from_numpy(self.query[rows]).to(self.device)
        q_sq = (q * q).sum(1)[:, None] if self.g_sq is not None else None
        if self.tile.numel() < len(rows) * TILE_COLUMNS:
            self.tile = torch.empty(len(rows) * TILE_COLUMNS, device=self.device)
        start = int(rows[0]) if self.symmetric else 0
        for col, stop in _column_tiles(start, len(self.shard)):
            if not self.symmetric and not self.below_cap[rows].any():
                break
            s = torch.matmul(q, self.g[col:stop].T, out=self.tile[: len(rows) * (stop - col)].view(len(rows), -1))
            if self.g_sq is not None and q_sq is not None:  # negated squared distance
                s.mul_(2).sub_(self.g_sq[None, col:stop]).sub_(q_sq)
            self._count(rows, s, col)
            past = max(col, int(rows[-1]) + 1)
            if self.symmetric and past < stop:  # the -inf the rows' own skips left there are skips of these rows too
                self._count(np.arange(past, stop), s[:, past - col :], start, transposed=True)

    def _count(self, rows: np.ndarray, s: torch.Tensor, col: int, transposed: bool = False) -> None:
        """Add score tile ``s`` (query rows ``rows`` x shard columns ``col ..``; ``transposed``: ``s.T`` is that tile)
        to the counts of those rows."""
        relevant, width = self.relevant, self.relevant.index.shape[1]
        skip = self.skip[rows] - col
        skip_r, skip_k = _nonzero((skip >= 0) & (skip < s.shape[0 if transposed else 1]))
        at = (torch.from_numpy(skip_r), torch.from_numpy(skip[skip_r, skip_k]))
        s[at[::-1] if transposed else at] = -torch.inf
        # the lowest relevant score that still matters, minus the slack: nothing below it is ever counted
        below = self.below_cap[rows]
        bound = np.where(below > 0, self.lo[rows, np.maximum(below - 1, 0)], np.inf).astype(np.float32)[:, None]
        r, c, v = _above(s, bound, transposed)
        if not len(r):
            return
        query_of = rows[r]
        n_above, n_low = self._bounds_below(query_of, v)
        near = np.flatnonzero(n_low != n_above)
        if len(near):
            q_rows, g_rows = query_of[near], c[near] + col
            exact = _exact_scores(self.query, q_rows, self.shard, g_rows, self.metric)[:, None]
            t, t_index = relevant.scores[q_rows], relevant.index[q_rows]
            n_above[near] = ((exact > t) | ((exact == t) & (g_rows[:, None] + self.offset < t_index))).sum(1)
        # hist[i, k]: entries outranking exactly the k lowest relevant items of row i; relevant item p is outranked
        # by those outranking at least kept - p of them
        hist = np.bincount(r * (width + 1) + n_above, minlength=len(rows) * (width + 1)).reshape(len(rows), -1)
        suffix = np.cumsum(hist[:, ::-1], 1)[:, ::-1]
        slots = np.arange(width)[None, :]
        need = self.kept[rows][:, None] - slots
        self.counts[rows] += np.where(need > 0, np.take_along_axis(suffix, np.clip(need, 0, width), 1), 0)
        if self.caps is not None:  # p + counts[p] rises with p: the items below the cap stay a prefix
            self.below_cap[rows] = (self.held[rows] & (slots + self.counts[rows] < self.caps[rows][:, None])).sum(1)

    def _bounds_below(self, query_of: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate (its query, its float32 tile score): how many of the query's kept relevant items it surely
        outranks (``hi`` bounds below it) and may outrank (``lo`` bounds at or below it). Unused slots hold +inf."""
        if self.relevant.index.shape[1] <= DIRECT_WIDTH:  # a few items: compare with each, one cache line per query
            return (self.hi[query_of] < v[:, None]).sum(1), (self.lo[query_of] <= v[:, None]).sum(1)
        key = _row_keys(query_of, v)
        first = self.first[query_of]
        return np.searchsorted(self.hi_keys, key, "left") - first, np.searchsorted(self.lo_keys, key, "right") - first


def _column_tiles(start: int, n: int) -> Iterator[tuple[int, int]]:
    """Column ranges of the score tiles from ``start`` to ``n``: narrow first, doubling up to TILE_COLUMNS -- with a
    rank cap, the first narrow tiles raise the bounds before the wide ones are scanned, so fewer entries are
    candidates."""
    width = max(1, TILE_COLUMNS // 8)
    while start < n:
        yield start, min(start + width, n)
        start, width = start + width, min(2 * width, TILE_COLUMNS)


def _row_keys(row: np.ndarray, x: np.ndarray) -> np.ndarray:
    """uint64 keys ordered by (row, float32 value): the row in the high 32 bits, the value's order-preserving bit
    pattern in the low 32 (negative floats reversed; -0.0 counted as +0.0)."""
    bits = (x.astype(np.float32) + np.float32(0)).view(np.uint32).astype(np.uint64)
    ordinal = np.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    return (row.astype(np.uint64) << np.uint64(32)) | ordinal


def _above(s: torch.Tensor, bound: np.ndarray, transposed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and float32 score of the entries of ``s`` -- of ``s.T`` when ``transposed`` -- at or above their
    row's ``bound`` [rows, 1].

    On the CPU, the maxima of groups of GROUP entries along a row (torch, all threads) find the groups that hold such
    an entry, and only those are compared entry by entry: one cheap pass over the tile when candidates are sparse.
    Dense tiles are compared entry by entry directly. ``s`` is always read along its rows (memory order)."""
    if s.is_cuda:
        m = s.T if transposed else s
        rt, ct = torch.nonzero(m >= torch.from_numpy(bound).to(s.device)).unbind(1)
        return rt.cpu().numpy(), ct.cpu().numpy(), m[rt, ct].cpu().numpy()
    n_rows, n_cols = s.shape
    values = s.numpy()
    limit = bound.T if transposed else bound  # broadcasts against s
    if (n_rows if transposed else n_cols) % GROUP == 0:
        if transposed:  # groups of GROUP rows of s, one per column: an element-wise max of GROUP rows
            group_max = s.view(n_rows // GROUP, GROUP, n_cols).amax(1).numpy()
            hit_g, hit_r = _nonzero(group_max >= limit)
        else:
            group_max = s.view(n_rows, n_cols // GROUP, GROUP).amax(2).numpy()
            hit_r, hit_g = _nonzero(group_max >= limit)
        if len(hit_r) <= group_max.size // 4:
            if transposed:
                groups = values.reshape(n_rows // GROUP, GROUP, n_cols)[hit_g, :, hit_r]
            else:
                groups = values.reshape(n_rows, n_cols // GROUP, GROUP)[hit_r, hit_g]
            h, at = _nonzero(groups >= bound[hit_r])
            return hit_r[h], hit_g[h] * GROUP + at, groups[h, at]
    i, j = _nonzero(values >= limit)
    return (j, i, values[i, j]) if transposed else (i, j, values[i, j])


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-d mask, row-major, through ``flatnonzero`` (an order of magnitude faster)."""
    rows, cols = np.divmod(np.flatnonzero(mask), mask.shape[1])
    return rows, cols


def combine_rank_counts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Total rank counts over disjoint gallery shards: the element-wise sum of :func:`shard_rank_counts`."""
    if not parts:
        raise InputError("combine_rank_counts needs at least one part")
    if len({p.shape for p in parts}) != 1:
        raise InputError(f"rank counts of different shapes cannot be combined: {[p.shape for p in parts]}")
    return np.sum(parts, axis=0)


def ranks_from_counts(relevant: RelevantItems, counts: np.ndarray, rank_cap: int | None = None) -> np.ndarray:
    """0-based rank r_p of each relevant item in the whole gallery: the relevant items ahead of it (p, from the
    ranking order) plus the non-relevant items outranking it (``counts``); -1 in unused slots. With the ``rank_cap``
    the counts were taken with, ranks at or beyond a query's cap (:func:`rank_caps`) are reported as the cap."""
    ranks = np.arange(relevant.index.shape[1])[None, :] + counts
    caps = rank_caps(relevant, rank_cap)
    if caps is not None:
        ranks = np.minimum(ranks, caps[:, None])
    return np.where(relevant.index >= 0, ranks, -1)


def relevant_ranks(
    query: Array,
    query_labels: Array,
    gallery: Array | None = None,
    gallery_labels: Array | None = None,
    limit: int | None = None,
    metric: str = "ip",
    device: str = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
    rank_cap: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of every relevant gallery item of every query, in one process: ``(ranks [Q, L], n_relevant [Q])``.

    ``ranks[i, p]`` is the 0-based rank of query i's p-th best relevant item (-1: unused slot); ``limit`` keeps the
    best ``limit`` per query; ``gallery=None`` is leave-one-out on the query set; ``rank_cap`` reports ranks at or
    beyond ``max(rank_cap, kept relevant items)`` as that value, which is much faster when relevant items rank deep
    (:func:`shard_rank_counts`). Queries are processed in chunks, each against the whole gallery as one shard.
    """
    query = _as_float32(query, "query")
    query_labels = _labels(query_labels, len(query), "query_labels")
    if (gallery is None) != (gallery_labels is None):
        raise InputError("pass both gallery and gallery_labels, or neither (leave-one-out on the query set)")
    leave_one_out = gallery is None or gallery_labels is None
    if gallery is None or gallery_labels is None:
        gallery, gallery_labels = query, query_labels
    else:
        gallery = _check_gallery(gallery, query.shape[1])
        gallery_labels = _labels(gallery_labels, len(gallery), "gallery_labels")
    _check_metric(metric)
    _, class_size = np.unique(gallery_labels, return_counts=True)
    widest = int(class_size.max()) if limit is None else min(int(limit), int(class_size.max()))
    if leave_one_out and chunk_size is None and len(query) * widest <= ELEMENTS_PER_CHUNK:
        relevant = shard_relevant_items(
            query, query_labels, query, query_labels, 0, np.arange(len(query)), metric, limit
        )
        counts = _leave_one_out_counts(query, relevant, metric, device, rank_cap, progress)
        return ranks_from_counts(relevant, counts, rank_cap), relevant.n_relevant
    chunk_size = chunk_size or max(TILE_ROWS, min(1 << 16, ELEMENTS_PER_CHUNK // max(widest, 1)))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for rows in _chunks(len(query), chunk_size, progress, "rank counts"):
        self_index = np.arange(rows.start, rows.stop) if leave_one_out else None
        relevant = shard_relevant_items(
            query[rows], query_labels[rows], gallery, gallery_labels, query_index=self_index, metric=metric, limit=limit
        )
        counts = shard_rank_counts(query[rows], relevant, gallery, 0, self_index, metric, device, rank_cap)
        parts.append((ranks_from_counts(relevant, counts, rank_cap), relevant.n_relevant))
    width = max(p[0].shape[1] for p in parts)
    ranks = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r, _ in parts])
    return ranks, np.concatenate([n for _, n in parts])


def metrics_from_ranks(
    ranks: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    map_at_r: bool = True,
    warn: bool = True,
) -> dict[str, float]:
    """R@K, P@K, MAP@R and R-precision from the relevant items' ranks (``relevant_ranks`` or the sharded
    equivalent); queries with no relevant item are left out (see the module docstring)."""
    ks = _check_ks(ks)
    evaluated = n_relevant > 0
    n, n_no_relevant = int(evaluated.sum()), int((~evaluated).sum())
    if n_no_relevant and warn:
        warnings.warn(
            f"{n_no_relevant} of {len(n_relevant)} queries have no relevant gallery item (a class with no other "
            "member); they are left out of every metric",
            stacklevel=3,
        )
    result: dict[str, float] = {}
    if n == 0:  # as pytorch-metric-learning: every metric 0
        result.update({f"R@{k}": 0.0 for k in ks}, **{f"P@{k}": 0.0 for k in ks})
        if map_at_r:
            result.update({"MAP@R": 0.0, "R-precision": 0.0})
        return {**result, "n_queries": 0, "n_queries_no_relevant": n_no_relevant}
    ranks, r = ranks[evaluated], n_relevant[evaluated]
    held = ranks >= 0
    result.update({f"R@{k}": float((ranks[:, 0] < k).mean()) for k in ks})
    result.update({f"P@{k}": float(((held & (ranks < k)).sum(1) / k).mean()) for k in ks})
    if map_at_r:
        if ranks.shape[1] < r.max():
            raise InputError("MAP@R needs the ranks of all relevant items: compute them without a limit")
        within = held & (ranks < r[:, None])
        precision = np.arange(1, ranks.shape[1] + 1)[None, :] / np.maximum(ranks + 1, 1)
        result["MAP@R"] = float(((within * precision).sum(1) / r).mean())
        result["R-precision"] = float((within.sum(1) / r).mean())
    return {**result, "n_queries": n, "n_queries_no_relevant": n_no_relevant}


def retrieval_metrics(
    query: Array,
    query_labels: Array,
    gallery: Array | None = None,
    gallery_labels: Array | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "ip",
    map_at_r: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Recall@K / P@K for each K in ``ks``, MAP@R and R-precision (see the module docstring).

    Returns ``{"R@1": .., "P@1": .., ..., "MAP@R": .., "R-precision": .., "n_queries": evaluated queries,
    "n_queries_no_relevant": excluded queries}``. ``map_at_r=False`` skips MAP@R/R-precision, which need the rank of
    every relevant item instead of the best max(ks).
    """
    ks = _check_ks(ks)
    limit = None if map_at_r else ks[-1]
    ranks, n_relevant = relevant_ranks(
        query, query_labels, gallery, gallery_labels, limit, metric, device, chunk_size, progress, rank_cap=ks[-1]
    )
    return metrics_from_ranks(ranks, n_relevant, ks, map_at_r)


def first_relevant_rank(
    query: Array,
    query_labels: Array,
    gallery: Array,
    gallery_labels: Array,
    metric: str = "ip",
    device: str = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """0-based rank of the best-ranked gallery item sharing each query's label, under the module's ranking rule
    (-1 when the gallery holds none). Exact over the whole gallery."""
    if gallery is None or gallery_labels is None:
        raise InputError("first_relevant_rank needs a gallery and its labels")
    ranks, _ = relevant_ranks(query, query_labels, gallery, gallery_labels, 1, metric, device, chunk_size, progress)
    return ranks[:, 0] if ranks.shape[1] else np.full(len(ranks), -1, np.int64)


def _recall_summary(ranks: np.ndarray, ks: Sequence[int], prefix: str) -> dict[str, float]:
    ranks = ranks[ranks >= 0]
    out = {f"{prefix}_R@{k}": 100.0 * float((ranks < k).mean()) for k in ks}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def image_text_metrics(
    image_emb: Array,
    text_emb: Array,
    text_image_ids: Array,
    ks: Sequence[int] = (1, 5, 10),
    image_labels: Array | None = None,
    metric: str = "ip",
    device: str = "auto",
    progress: bool | None = None,
) -> dict[str, float]:
    """i2t/t2i Recall@K (percent), ``rsum``, median/mean rank (see the module docstring).

    ``text_image_ids[j]`` is the row of ``image_emb`` that caption j describes (several captions per image).
    ``image_labels`` (optional) makes images with the same label interchangeable (e.g. two renderings of one
    object): a caption then also hits on any image sharing its image's label.
    """
    ks = _check_ks(ks)
    image_emb = _as_float32(image_emb, "image_emb")
    text_emb = _check_gallery(text_emb, image_emb.shape[1])
    text_image_ids = _labels(text_image_ids, len(text_emb), "text_image_ids")
    if text_image_ids.min() < 0 or text_image_ids.max() >= len(image_emb):
        raise InputError(
            f"text_image_ids must index image_emb rows (0..{len(image_emb) - 1}), got values in "
            f"[{text_image_ids.min()}, {text_image_ids.max()}]"
        )
    image_labels = (
        np.arange(len(image_emb)) if image_labels is None else _labels(image_labels, len(image_emb), "image_labels")
    )
    text_labels = image_labels[text_image_ids]
    i2t = first_relevant_rank(image_emb, image_labels, text_emb, text_labels, metric, device, progress=progress)
    t2i = first_relevant_rank(text_emb, text_labels, image_emb, image_labels, metric, device, progress=progress)
    return image_text_metrics_from_ranks(i2t, t2i, ks)


def image_text_metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``image_text_metrics`` from the 0-based rank of each image's first correct caption (``i2t``, -1: the image has
    no caption) and of each caption's first correct image (``t2i``) -- e.g. from sharded rank counts."""
    ks = _check_ks(ks)
    out = {**_recall_summary(i2t, ks, "i2t"), **_recall_summary(t2i, ks, "t2i")}
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    uncaptioned = int((i2t < 0).sum())
    if uncaptioned:
        warnings.warn(f"{uncaptioned} images have no caption and are left out of i2t", stacklevel=3)
    out.update(n_images=len(i2t), n_texts=len(t2i), n_images_no_caption=uncaptioned)
    return out


def coco_1k_folds(
    image_emb: Array, text_emb: Array, text_image_ids: Array, n_folds: int = 5, fold_size: int = 1000, **kwargs
) -> dict[str, float]:
    """COCO 1K protocol: ``image_text_metrics`` on ``n_folds`` consecutive folds of ``fold_size`` images (each with
    its own captions), averaged key by key."""
    image_emb, text_emb = _as_float32(image_emb, "image_emb"), _as_float32(text_emb, "text_emb")
    text_image_ids = _labels(text_image_ids, len(text_emb), "text_image_ids")
    if len(image_emb) < n_folds * fold_size:
        raise InputError(
            f"{n_folds} folds of {fold_size} images need {n_folds * fold_size} images, got {len(image_emb)}"
        )
    image_labels = kwargs.pop("image_labels", None)
    folds: list[dict[str, float]] = []
    for lo in range(0, n_folds * fold_size, fold_size):
        captions = np.flatnonzero((text_image_ids >= lo) & (text_image_ids < lo + fold_size))
        fold_labels = None if image_labels is None else np.asarray(image_labels)[lo : lo + fold_size]
        folds.append(
            image_text_metrics(
                image_emb[lo : lo + fold_size],
                text_emb[captions],
                text_image_ids[captions] - lo,
                image_labels=fold_labels,
                **kwargs,
            )
        )
    return {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}


def format_table(results: dict[str, float] | list[dict[str, float]], names: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per result dict (``names`` label the rows), one column per metric."""
    rows = [results] if isinstance(results, dict) else list(results)
    if names is not None and len(names) != len(rows):
        raise InputError(f"got {len(names)} names for {len(rows)} result rows")
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]

    def cell(value: Any) -> str:
        if isinstance(value, (bool, np.bool_)) or value is None:
            return str(value)
        if isinstance(value, (int, np.integer)):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return f"{value:.4f}" if abs(float(value)) < 10 else f"{value:.2f}"
        return str(value)

    header = ([""] if names is not None else []) + keys
    body = [
        ([names[i]] if names is not None else []) + [cell(row.get(key, "")) for key in keys]
        for i, row in enumerate(rows)
    ]
    widths = [max(len(line[c]) for line in [header] + body) for c in range(len(header))]
    first_left = names is not None  # row names read left-aligned, numbers right-aligned

    def fmt(line: list[str]) -> str:
        return "  ".join(
            text.ljust(width) if c == 0 and first_left else text.rjust(width)
            for c, (text, width) in enumerate(zip(line, widths))
        ).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in body])
