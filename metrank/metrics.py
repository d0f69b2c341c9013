"""Retrieval metrics computed from exact, tie-stable k-nearest neighbours, in bounded memory.

Ranking rule (used everywhere here): gallery items are ordered by score, best first (inner product for
``metric="ip"``, smallest squared L2 distance for ``metric="l2"``); **among equal scores the lower gallery index ranks
first**. Results therefore equal a brute-force ``np.lexsort((index, -score))`` reference exactly, ties included.

How the exact top-k is found fast: an exact FAISS flat index (GPU when present) returns the ``k + 1`` best items of
each query (``k + 2`` when the query itself must be skipped). Its *set of scores* is exact, but FAISS does not order
equal scores by index. So (1) inside the returned list, rows with equal neighbouring scores are re-sorted by
(score, index); (2) a row whose ``k``-th and ``k+1``-th scores are equal (a tie across the cut, where FAISS may have
kept the wrong item) is recomputed against the whole gallery with a tie-exact selection. Bit-identical gallery
vectors are indexed once and expanded back (BLAS rounds one dot product differently depending on the column's place
in the matrix, which would otherwise split such exact duplicates). Queries are processed in chunks, so memory is
O(chunk x k) plus FAISS's fixed-size GEMM blocks -- never an N x N matrix.

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

import numpy as np
import torch
from tqdm.auto import tqdm

from metrank.errors import InputError
from metrank.index import _as_float32, create_index
from metrank.validation import check_labels

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


def _torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    return torch.device(device)


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
        self.device = _torch_device(device)
        self._vectors: torch.Tensor | None = None

    def __call__(self, q: np.ndarray) -> torch.Tensor:
        if self._vectors is None:  # made on first use: most evaluations never rescore
            self._vectors = torch.from_numpy(self.vectors).to(self.device)
            self._sq_norms = (self._vectors * self._vectors).sum(1) if self.metric == "l2" else None
            self._slot = None if self.slot is None else torch.from_numpy(self.slot).to(self.device)
        qt = torch.from_numpy(q).to(self.device)
        s = qt @ self._vectors.T
        if self.metric == "l2":
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
    tied = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(1)) if scores.shape[1] > 1 else []
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
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    _check_metric(metric)
    leave_one_out = gallery is None
    engine = ExactKNN(query if leave_one_out else _check_gallery(gallery, query.shape[1]), metric, device)
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


def _relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool) -> np.ndarray:
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    found = classes[pos] == query_labels
    return np.where(found, counts[pos], 0) - int(leave_one_out)


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
    "n_queries_no_relevant": excluded queries}``. ``map_at_r=False`` skips MAP@R/R-precision, which need
    k = the largest class size instead of max(ks).
    """
    query = _as_float32(query, "query")
    query_labels = _labels(query_labels, len(query), "query_labels")
    if (gallery is None) != (gallery_labels is None):
        raise InputError("pass both gallery and gallery_labels, or neither (leave-one-out on the query set)")
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    else:
        gallery = _check_gallery(gallery, query.shape[1])
        gallery_labels = _labels(gallery_labels, len(gallery), "gallery_labels")
    ks = _check_ks(ks)
    _check_metric(metric)

    n_relevant = _relevant_counts(query_labels, gallery_labels, leave_one_out)
    evaluated = np.flatnonzero(n_relevant > 0)
    n_no_relevant = len(query) - len(evaluated)
    if n_no_relevant:
        warnings.warn(
            f"{n_no_relevant} of {len(query)} queries have no relevant gallery item (a class with no other "
            "member); they are left out of every metric",
            stacklevel=2,
        )
    result: dict[str, float] = {}
    if len(evaluated) == 0:  # as pytorch-metric-learning: every metric 0
        result.update({f"R@{k}": 0.0 for k in ks}, **{f"P@{k}": 0.0 for k in ks})
        if map_at_r:
            result.update({"MAP@R": 0.0, "R-precision": 0.0})
        return {**result, "n_queries": 0, "n_queries_no_relevant": n_no_relevant}

    n_available = len(gallery) - int(leave_one_out)
    k = min(max(ks[-1], int(n_relevant.max()) if map_at_r else 0), n_available)
    engine = ExactKNN(gallery, metric, device)
    chunk_size = chunk_size or max(256, min(8192, ELEMENTS_PER_CHUNK // k))
    hits = {kk: 0 for kk in ks}
    precision = {kk: 0.0 for kk in ks}
    average_precision = r_precision = 0.0
    q_sub, l_sub, r_sub = query[evaluated], query_labels[evaluated], n_relevant[evaluated]
    for rows in _chunks(len(evaluated), chunk_size, progress, "retrieval metrics"):
        self_ids = evaluated[rows] if leave_one_out else None
        _, ids = engine.search(q_sub[rows], k, self_ids)
        relevant = (ids >= 0) & (gallery_labels[np.maximum(ids, 0)] == l_sub[rows, None])
        first_hit = np.where(relevant.any(1), relevant.argmax(1), k)
        n_hits = np.cumsum(relevant, axis=1)
        for kk in ks:
            hits[kk] += int((first_hit < kk).sum())
            precision[kk] += float(n_hits[:, min(kk, k) - 1].sum()) / kk
        if map_at_r:
            r = r_sub[rows, None]
            within_r = np.arange(1, k + 1)[None, :] <= r
            precision_at_i = n_hits / np.arange(1, k + 1)[None, :]
            average_precision += float(((precision_at_i * (relevant & within_r)).sum(1) / r[:, 0]).sum())
            r_precision += float(((relevant & within_r).sum(1) / r[:, 0]).sum())
    n = len(evaluated)
    result.update({f"R@{kk}": hits[kk] / n for kk in ks}, **{f"P@{kk}": precision[kk] / n for kk in ks})
    if map_at_r:
        result.update({"MAP@R": average_precision / n, "R-precision": r_precision / n})
    return {**result, "n_queries": n, "n_queries_no_relevant": n_no_relevant}


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
    (-1 when the gallery holds none). Exact over the whole gallery, computed in query chunks."""
    query, gallery = _as_float32(query, "query"), _check_gallery(gallery, np.shape(query)[1])
    query_labels = _labels(query_labels, len(query), "query_labels")
    gallery_labels = _labels(gallery_labels, len(gallery), "gallery_labels")
    _check_metric(metric)
    scorer = GalleryScorer(gallery, metric, device)
    dev = scorer.device
    g_labels = torch.from_numpy(gallery_labels).to(dev)
    columns = torch.arange(len(gallery), device=dev)
    ranks = np.empty(len(query), np.int64)
    chunk_size = chunk_size or max(1, ELEMENTS_PER_CHUNK // len(gallery))
    for rows in _chunks(len(query), chunk_size, progress, "ranks"):
        s = scorer(query[rows])
        is_relevant = torch.from_numpy(query_labels[rows]).to(dev)[:, None] == g_labels[None, :]
        best = torch.where(is_relevant, s, torch.tensor(-torch.inf, device=dev)).max(1, keepdim=True).values
        best_col = (is_relevant & (s == best)).to(torch.uint8).argmax(1, keepdim=True)  # first = lowest index
        rank = (s > best).sum(1) + ((s == best) & (columns[None, :] < best_col)).sum(1)
        ranks[rows] = torch.where(is_relevant.any(1), rank, torch.tensor(-1, device=dev)).cpu().numpy()
    return ranks


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
    common = dict(metric=metric, device=device, progress=progress)
    i2t = first_relevant_rank(image_emb, image_labels, text_emb, text_labels, **common)
    t2i = first_relevant_rank(text_emb, text_labels, image_emb, image_labels, **common)
    out = {**_recall_summary(i2t, ks, "i2t"), **_recall_summary(t2i, ks, "t2i")}
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    uncaptioned = int((i2t < 0).sum())
    if uncaptioned:
        warnings.warn(f"{uncaptioned} images have no caption and are left out of i2t", stacklevel=2)
    out.update(n_images=len(image_emb), n_texts=len(text_emb), n_images_no_caption=uncaptioned)
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

    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)) or value is None:
            return str(value)
        if isinstance(value, (int, np.integer)):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
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
