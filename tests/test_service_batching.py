"""Dynamic query batching: concurrent callers get exactly the hits they would get alone, in fewer FAISS calls."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from metrank.errors import InputError
from metrank.search import QueryBatcher, Retriever

DIM = 32


def test_batched_answers_equal_unbatched():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, DIM)).astype(np.float32)
    retriever = Retriever.create(dim=DIM)
    retriever.add(vectors=vectors, metadata=[{"c": i % 5, "rare": i % 400 == 1} for i in range(2000)], progress=False)
    retriever.set_hubness("nnn", bank=rng.standard_normal((50, DIM)).astype(np.float32), alpha=0.5, k=4)
    queries = rng.standard_normal((96, DIM)).astype(np.float32)
    settings = [
        {"k": 10},
        {"k": 5, "filter": {"c": 2}},
        {"k": 10, "filter": {"rare": True}},
        {"k": 7, "modality": "vector", "hubness": False},
    ]
    requests = [(q, settings[i % len(settings)]) for i, q in enumerate(queries)]
    batcher = QueryBatcher(retriever, max_wait=0.05)
    with ThreadPoolExecutor(32) as pool:
        batched = list(pool.map(lambda r: batcher.search(r[0], **r[1]), requests))
    assert batcher.queries == 96 and batcher.batches < 96 / 4  # queries were coalesced
    for (q, kw), hits in zip(requests, batched):
        alone = retriever.search(vector=q, **kw)
        assert [h.id for h in hits] == [h.id for h in alone]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="filter key"):  # bad requests fail in the caller's thread
        QueryBatcher(retriever).search(queries[0], filter={"bad key": 1})
