"""Dynamic batching of concurrent searches: many callers' queries answered by one batched FAISS search.

An exact query against a large gallery is a memory-bound scan; a batch of queries shares that scan, so concurrent
single-query callers are served far faster together than one by one. :class:`QueryBatcher` has no worker thread
(leader/follower): a caller that finds no batch running leads - it takes every queued query (its own first), groups
them by ``(k, filter, modality, hubness)``, answers each group with one :meth:`Retriever.search_vectors` call,
and hands the lead to the oldest caller still waiting. A lone caller therefore searches in its own thread, exactly
as without batching; callers arriving while a batch runs queue up for the next one.

Waiting is adaptive: callers whose answers just came back need a moment to send their next query, so when recent
batches held several queries the leader waits for as many as the largest of the last 8 batches, at most
``min(max_wait, batch_time / 4)``; a lone caller (recent batches of 1) never waits.

FAISS scans a flat index once per query below ``distance_compute_blas_threshold`` queries (128000 in this build),
which leaves batching little to share. For groups of at least :data:`BLAS_MIN_QUERIES` queries the leader lowers
that threshold (and the database block is :data:`BLAS_DATABASE_BLOCK` rows), so a batch is one BLAS pass over the
gallery (measured on 100k x 512: batches of 16 / 64 / 256 at 1.7x / 4x / 2x the default kernel's rate); smaller
groups run with FAISS' default, which is faster for them. These are process-wide FAISS settings: they change speed
only, and only one leader searches at a time.

The planner answers each query independently of its batch, so a caller gets the hits it would get alone (the same
ids; scores equal up to the float rounding of FAISS' batched and single-query kernels).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from metrank.errors import InputError
from metrank.search.retriever import Hit, Retriever
from metrank.validation import check_positive_int

BLAS_MIN_QUERIES = 8
BLAS_DATABASE_BLOCK = 65536
_DEFAULT_BLAS_THRESHOLD = int(faiss.cvar.distance_compute_blas_threshold)  # FAISS' own, read at import


@dataclass
class _Request:
    query: np.ndarray
    k: int
    filter: dict[str, Any] | None
    modality: str | None
    hubness: bool
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    hits: list[Hit] | None = None
    error: BaseException | None = None

    def group(self) -> tuple:
        return (self.k, json.dumps(self.filter, sort_keys=True), self.modality, self.hubness)

    def finish(self, hits: list[Hit] | None = None, error: BaseException | None = None) -> None:
        self.hits, self.error, self.done = hits, error, True
        self.wake.set()


class QueryBatcher:
    """``batcher.search(vector, k=10, filter=..., modality=..., hubness=...)`` from any thread; see the module
    docstring. ``max_batch`` bounds the queries per batch; ``enabled=False`` answers each query on its own (the
    unbatched path, for comparison)."""

    def __init__(
        self, retriever: Retriever, max_batch: int = 256, max_wait: float = 0.005, enabled: bool = True
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise InputError("max_batch must be >= 1 and max_wait >= 0")
        self.retriever = retriever
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.enabled = enabled
        if enabled:
            faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Request] = deque()
        self._running = False
        self._recent_sizes: deque[int] = deque([1], maxlen=8)
        self._last_seconds = 0.0
        self.batches = 0
        self.queries = 0

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        modality: str | None = None,
        hubness: bool = True,
    ) -> list[Hit]:
        """The hits of one query vector [dim] or [1, dim], as ``Retriever.search(vector=...)`` would return them."""
        query = self.retriever.embed_query(vector=np.asarray(vector, np.float32).reshape(-1))
        self.retriever.store.where(filter, modality)  # bad filters fail here, in the caller's thread
        k = check_positive_int(k, "k")
        if not self.enabled:
            return self.retriever.search_vectors(query, k, filter, modality, hubness)[0]
        request = _Request(query, k, filter, modality, hubness)
        with self._cond:
            self._pending.append(request)
            if not self._running:
                self._running = request.lead = True
            self._cond.notify_all()  # a leader waiting for stragglers
        while not request.done:
            if request.lead:
                request.lead = False
                self._lead()
            else:
                request.wake.wait()
                request.wake.clear()
        if request.error is not None:
            raise request.error
        assert request.hits is not None
        return request.hits

    def _lead(self) -> None:
        """Take and answer one batch (the leader's own query is the oldest pending one), then pass the lead on."""
        with self._cond:
            target = min(self.max_batch, max(self._recent_sizes))
            if target > 1 and len(self._pending) < target:
                deadline = time.monotonic() + min(self.max_wait, self._last_seconds / 4)
                while len(self._pending) < target and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        started = time.monotonic()
        groups: dict[tuple, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.group(), []).append(request)
        try:
            for members in groups.values():
                first = members[0]
                blas = len(members) >= BLAS_MIN_QUERIES
                faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES if blas else _DEFAULT_BLAS_THRESHOLD
                try:
                    rows = self.retriever.search_vectors(
                        np.concatenate([m.query for m in members]), first.k, first.filter, first.modality, first.hubness
                    )
                except Exception as err:  # every caller of the group sees the error
                    for m in members:
                        m.finish(error=err)
                    continue
                for m, hits in zip(members, rows):
                    m.finish(hits)
        finally:
            for request in batch:  # e.g. KeyboardInterrupt mid-batch: nobody may wait forever
                if not request.done:
                    request.finish(error=RuntimeError("the search batch was interrupted"))
            with self._cond:
                self._last_seconds = time.monotonic() - started
                self._recent_sizes.append(len(batch))
                self.batches += 1
                self.queries += len(batch)
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._running = False
