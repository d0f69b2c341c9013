"""The search planner: exact filtered and hubness-corrected top-k on top of any FAISS index.

Filtered search is exact: with ``c`` matching items out of ``N`` the index is asked for ``m ≈ 2·k·N/c``
candidates, the matching ones kept, and ``m`` grows (×4) until ``k`` matches are found or the index is exhausted;
when ``m`` would exceed ``c`` (or ``c ≤ 4k``) the ``c`` matching vectors are scored directly instead (exact
rescoring). Hubness-corrected search (:mod:`metrank.search.hubness`) uses the same loop with a stopping bound: an
unfetched item scores at most ``s_m − min(bias)``, so a query is done once its k-th corrected score beats that.

Each query's answer depends only on the query (never on the other queries of a batch): rows are ``(id, score,
raw_score)`` sorted by corrected score, ties broken by the smaller id.
"""

from __future__ import annotations

import math

import numpy as np

from metrank.index import Index
from metrank.search.hubness import HubnessState
from metrank.search.store import ItemStore, Where

Row = list[tuple[int, float, float]]


def plan_search(
    index: Index,
    store: ItemStore,
    queries: np.ndarray,
    k: int,
    where: Where | None,
    hubness: HubnessState | None,
    modality: str | None = None,
) -> list[Row]:
    """Rows of ``(id, score, raw_score)`` for items matching ``where`` (of ``modality``), corrected by ``hubness``
    when given. The caller holds the retriever's read lock."""
    total = index.ntotal
    if total == 0:
        return [[] for _ in queries]
    if where is not None:
        matches = store.count(where)
        if matches == 0:
            return [[] for _ in queries]
        fetch = math.ceil(2 * k * total / matches)
        if fetch >= matches or matches <= 4 * k:
            return _score_matching(store, queries, k, where, hubness)
    else:
        fetch = k
    if hubness is not None:
        fetch *= 4
    fetch = min(total, max(fetch, k))
    min_bias = 0.0
    if hubness is not None:
        min_bias = hubness.min_bias()
        if len(hubness) < total and (hubness.modality is None or modality != hubness.modality):
            min_bias = min(min_bias, 0.0)  # uncovered items (bias 0) may be among the candidates
    results: list[Row | None] = [None] * len(queries)
    pending = np.arange(len(queries))
    while pending.size:
        scores, ids = index.search(queries[pending], fetch)
        exhausted = fetch >= total
        allowed = None
        if where is not None:
            allowed = np.fromiter(store.matching(np.unique(ids[ids >= 0]), where), dtype=np.int64)
        still = []
        for row, q in enumerate(pending):
            keep = ids[row] >= 0
            if allowed is not None:
                keep &= np.isin(ids[row], allowed)
            cand_ids, raw = ids[row][keep], scores[row][keep].astype(np.float64)
            corrected, applied = raw, False
            if hubness is not None and cand_ids.size:
                applied = bool(hubness.applies(cand_ids[:1])[0])
                if applied:
                    corrected = raw - hubness.bias(cand_ids)
            top = top_k(cand_ids, corrected, raw, k)
            bound = float(scores[row, -1]) - (min_bias if applied else 0.0)
            if exhausted or (len(top) == k and top[-1][1] >= bound):
                results[q] = top
            else:
                still.append(q)
        pending = np.array(still, dtype=np.int64)
        fetch = min(total, fetch * 4)
    return [row if row is not None else [] for row in results]


def _score_matching(
    store: ItemStore, queries: np.ndarray, k: int, where: Where, hubness: HubnessState | None
) -> list[Row]:
    """Exact scoring of the (few) items matching ``where``."""
    ids, vectors = store.vectors(where)
    sims = queries @ vectors.T
    out = []
    for row in sims:
        raw = row.astype(np.float64)
        corrected = raw
        if hubness is not None and hubness.applies(ids[np.argmax(raw)][None])[0]:
            corrected = raw - hubness.bias(ids)
        out.append(top_k(ids, corrected, raw, k))
    return out


def top_k(ids: np.ndarray, corrected: np.ndarray, raw: np.ndarray, k: int) -> Row:
    """``k`` best ``(id, score, raw_score)`` by corrected score (ties: smaller id first)."""
    order = np.lexsort((ids, -corrected))[:k]
    return [(int(ids[j]), float(corrected[j]), float(raw[j])) for j in order]
