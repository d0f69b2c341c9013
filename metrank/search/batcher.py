"""Dynamic batching of concurrent searches: many callers' queries answered by one batched FAISS search.

An exact query against a large gallery is a memory-bound scan; a batch of queries shares that scan (FAISS computes
them as one matrix product), so concurrent single-query callers are served far faster together than one by one.
:class:`QueryBatcher` runs one worker thread: it takes every query queued while the previous batch ran (waiting at
most ``max_wait`` seconds for more, 0 = never wait, so a lone caller pays nothing), groups them by ``(k, filter,
modality, hubness)`` and answers each group with one :meth:`Retriever.search_vectors` call. The planner answers
each query independently of its batch, so a caller gets the hits it would get alone (same ids; scores equal up to
float rounding of FAISS' batched vs single-query kernels).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metrank.errors import InputError
from metrank.search.retriever import Hit, Retriever


@dataclass
class _Request:
    query: np.ndarray
    k: int
    filter: dict[str, Any] | None
    modality: str | None
    hubness: bool
    future: Future = field(default_factory=Future)

    def group(self) -> tuple:
        return (self.k, json.dumps(self.filter, sort_keys=True), self.modality, self.hubness)


class QueryBatcher:
    """``batcher.search(vector, k=10, filter=..., modality=..., hubness=...)`` from any thread; see the module
    docstring. ``max_batch`` bounds the queries per worker step; ``enabled=False`` answers each query in the
    caller's thread (the unbatched path, for comparison)."""

    def __init__(self, retriever: Retriever, max_batch: int = 256, max_wait: float = 0.0, enabled: bool = True) -> None:
        if max_batch < 1 or max_wait < 0:
            raise InputError("max_batch must be >= 1 and max_wait >= 0")
        self.retriever = retriever
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.enabled = enabled
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if not self.enabled:
            return self.retriever.search_vectors(query, k, filter, modality, hubness)[0]
        request = _Request(query, k, filter, modality, hubness)
        self._ensure_worker()
        self._queue.put(request)
        return request.future.result()

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="metrank-query-batcher", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the worker (queued queries are still answered)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _take(self) -> list[_Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(request)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            groups: dict[tuple, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.group(), []).append(request)
            for members in groups.values():
                first = members[0]
                try:
                    rows = self.retriever.search_vectors(
                        np.concatenate([m.query for m in members]), first.k, first.filter, first.modality, first.hubness
                    )
                except BaseException as err:  # the callers see the error, the worker keeps running
                    for m in members:
                        m.future.set_exception(err)
                    continue
                for m, hits in zip(members, rows):
                    m.future.set_result(hits)
            self.batches += 1
            self.queries += len(batch)
