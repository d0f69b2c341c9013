"""metrank.scale on a real local Ray cluster (2 CPUs): sharded evaluation, index build, embedding and training
against their single-process counterparts."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from metrank.metrics import retrieval_metrics  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every test of this session."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def clustered(n, d, classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    x = centres[labels] + rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


# ---- sharded evaluation ---------------------------------------------------------------------------------------------
def test_sharded_metrics_equal_single_process_metrics(ray_cluster):
    from metrank.scale.evaluate import retrieval_metrics as sharded_metrics

    x, labels = clustered(700, 16, 60, seed=0)
    x[650:] = x[:50]  # duplicates in another shard
    query, q_labels = x[:200], labels[:200]
    shards = [(x[200:330], labels[200:330]), (x[330:331], labels[330:331]), (x[331:], labels[331:])]
    gallery, g_labels = x[200:], labels[200:]
    expected = retrieval_metrics(query, q_labels, gallery, g_labels, ks=(1, 5, 1000))
    assert sharded_metrics(query, q_labels, shards, ks=(1, 5, 1000), query_chunk=77) == expected
    labels[0] = 999  # a singleton: left out, with a warning, in both
    with pytest.warns(UserWarning, match="no relevant gallery item"):
        expected = retrieval_metrics(x, labels, ks=(1, 10), map_at_r=False)
    with pytest.warns(UserWarning, match="no relevant gallery item"):
        assert sharded_metrics(x, labels, ks=(1, 10), map_at_r=False) == expected  # leave-one-out
    with pytest.raises(ValueError, match="gallery shard 1 has dimension 8"):
        sharded_metrics(query, q_labels, [shards[0], (np.ones((5, 8), np.float32), np.zeros(5, np.int64))])
