"""metrank.index: FAISS wrapper behaviour checked against brute-force numpy search."""

import os

import faiss
import numpy as np
import pytest
import torch

from metrank.index import Index, choose_index, create_index, index_memory


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes: OpenMP start-up/barriers dominate k-means on a busy 2-core machine, so use one thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def data(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(q, x, k, metric="ip"):
    s = (
        q.astype(np.float64) @ x.T.astype(np.float64)
        if metric == "ip"
        else ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    )
    order = np.argsort(-s if metric == "ip" else s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_matches_brute_force_with_64bit_ids(metric):
    x, q = data(), data(50, seed=1)
    index = create_index("Flat", dim=16, metric=metric)
    big_ids = (1 << 40) + 3 * np.arange(len(x), dtype=np.int64)
    index.add(x, ids=big_ids)
    scores, ids = index.search(q, k=10, batch_size=16)
    ref_scores, ref_pos = brute_force(q, x, 10, metric)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and scores.shape == (50, 10)
    np.testing.assert_array_equal(ids, big_ids[ref_pos])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (index.ntotal, index.dim, index.metric) == (600, 16, metric)


def test_auto_ids_continue_from_largest_and_padding():
    index = create_index("flat", dim=16)
    index.add(data(2), ids=np.array([5, 100]))
    assert index.add(data(3, seed=2)).tolist() == [101, 102, 103]
    scores, ids = index.search(torch.from_numpy(data(4, seed=3)).double(), k=8)  # torch float64 is accepted
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert set(ids[0, :5]) == {5, 100, 101, 102, 103}


@pytest.mark.parametrize("spec", ["Flat", "ivf_flat", "IVF16,PQ4x4", "PQ4x4"])
def test_remove_ids_removes(spec):
    x = data(800)
    index = create_index(spec, dim=16, **({"nlist": 16} if spec == "ivf_flat" else {}))
    if not index.is_trained:
        index.train(x)
    ids = np.arange(800, dtype=np.int64) * 7 + 11
    index.add(x, ids)
    if "IVF" in index.spec:
        index.nprobe = 16
    assert index.remove_ids(ids[:100]) == 100
    assert index.remove_ids(np.array([1, 2, 3])) == 0  # unknown ids
    assert index.ntotal == 700
    np.testing.assert_array_equal(np.sort(index.stored_ids()), ids[100:])
    _, found = index.search(x[:100], k=20)
    assert not np.isin(found, ids[:100]).any()
    _, found = index.search(x[100:150], k=1)  # the survivors still map to their own ids
    assert (found[:, 0] == ids[100:150]).mean() > (0.95 if spec in ("Flat", "ivf_flat") else 0.5)


def test_hnsw_removal_is_a_clear_error_and_efsearch_is_settable():
    index = create_index("hnsw", dim=16, m=8)
    index.add(data())
    index.efSearch = 123
    assert index.efSearch == 123
    with pytest.raises(ValueError, match="does not support removal"):
        index.remove_ids(np.array([0]))
    with pytest.raises(ValueError, match="IVF indexes only"):
        index.nprobe = 4


def test_refined_ivf_pq_takes_64bit_ids_and_reranks_exactly(tmp_path):
    # IVF-PQ candidates re-ranked by exact distances (RFlat): the refine wrapper stores no ids of its own
    x = data(n=800, d=16)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 2**40
    index = create_index("IVF8,PQ4x4,RFlat", dim=16, device="cpu")
    index.train(x)
    index.add(x, ids)
    index.nprobe = 8
    scores, found = index.search(x[:50], 5)
    raw = faiss.index_factory(16, "IVF8,PQ4x4,RFlat", faiss.METRIC_INNER_PRODUCT)  # FAISS alone, ids 0..n-1
    raw.train(x)
    raw.add(x)
    faiss.extract_index_ivf(raw).nprobe = 8
    raw_scores, raw_rows = raw.search(x[:50], 5)
    np.testing.assert_array_equal(found, ids[raw_rows])
    np.testing.assert_array_equal(scores, raw_scores)
    rows = np.searchsorted(ids, found)  # the re-ranked scores are exact inner products
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", x[:50], x[rows]), rtol=1e-5)
    index.save(str(tmp_path / "refined.faiss"))
    loaded = Index.load(str(tmp_path / "refined.faiss"), device="cpu")
    loaded.nprobe = 8
    np.testing.assert_array_equal(loaded.search(x[:50], 5)[1], found)


@pytest.mark.parametrize(
    "spec, kwargs",
    [("Flat", {}), ("ivf_flat", {"nlist": 8}), ("HNSW16", {}), ("ivf_pq", {"nlist": 8, "nbits": 4}), ("PQ4x4", {})],
)
def test_save_load_round_trip(tmp_path, spec, kwargs):
    x = data(1200)
    index = create_index(spec, dim=16, metric="l2", **kwargs)
    index.train(x, max_train=1000)
    index.add(x, ids=np.arange(1200) + (1 << 33))
    if "IVF" in index.spec:
        index.nprobe = 3
    path = str(tmp_path / "sub" / "gallery.faiss")
    os.makedirs(os.path.dirname(path))
    open(path, "wb").write(b"old contents get replaced")
    index.save(path)
    assert os.listdir(tmp_path / "sub") == ["gallery.faiss"]  # no temporary file left behind
    loaded = Index.load(path, device="cpu")
    assert (loaded.ntotal, loaded.dim, loaded.metric) == (1200, 16, "l2")
    before, after = index.search(x[:30], k=5), loaded.search(x[:30], k=5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert after[1].min() >= 1 << 33
    assert loaded.add(data(1, seed=9)).tolist() == [(1 << 33) + 1200]
    if "IVF" in index.spec:
        assert loaded.nprobe == 3


def test_ivf_trains_on_sample_requires_training_and_nprobe_all_is_exact():
    x, q = data(2000), data(20, seed=5)
    index = create_index("ivf_flat", dim=16, nlist=16)
    assert not index.is_trained
    with pytest.raises(ValueError, match="must be trained"):
        index.add(x)
    with pytest.raises(ValueError, match="must be trained"):
        index.search(q, k=3)
    index.train(x, max_train=700)
    index.add(x)
    index.nprobe = 16
    exact = create_index("Flat", dim=16)
    exact.add(x)
    np.testing.assert_array_equal(index.search(q, 10)[1], exact.search(q, 10)[1])
    with pytest.raises(ValueError, match="training"):
        create_index("IVF64,Flat", dim=16).train(x[:10])


def test_memory_bytes_tracks_stored_vectors():
    x = data(1000)
    flat, pq = create_index("Flat", dim=16), create_index("PQ4x4", dim=16)
    pq.train(x, max_train=400)
    flat.add(x)
    pq.add(x)
    assert 1000 * 16 * 4 <= flat.memory_bytes() < 1000 * 16 * 4 + 1000 * 8 * 2 + 4096
    assert pq.memory_bytes() < flat.memory_bytes() / 4


def test_bad_input_raises_value_error():
    index = create_index("Flat", dim=4)
    x = np.ones((3, 4), np.float32)
    for bad, message in [
        (np.full((3, 4), np.nan, np.float32), "NaN"),
        (np.full((3, 4), np.inf, np.float32), "inf"),
        (np.ones((3, 4), np.int64), "floating dtype"),
        (np.ones((0, 4), np.float32), "empty"),
        (np.ones((3, 5), np.float32), "dimension 5"),
        (np.ones(4, np.float32), "2-D"),
    ]:
        with pytest.raises(ValueError, match=message):
            index.add(bad)
        with pytest.raises(ValueError, match=message):
            index.search(bad, k=1)
    with pytest.raises(ValueError, match="one id per vector"):
        index.add(x, ids=np.arange(2))
    with pytest.raises(ValueError, match="duplicates"):
        index.add(x, ids=np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        index.add(x, ids=np.arange(3.0))
    with pytest.raises(ValueError, match="positive integer"):
        index.search(x, k=0)
    with pytest.raises(ValueError, match="valid names: flat, hnsw, ivf_flat, ivf_pq|not a short name"):
        create_index("NoSuchIndex", dim=4)
    with pytest.raises(ValueError, match="dim"):
        create_index("Flat")
    with pytest.raises(ValueError, match="metric"):
        create_index("Flat", dim=4, metric="cosine")
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="no GPU"):
            create_index("Flat", dim=4, device="gpu")
    with pytest.raises(FileNotFoundError):
        Index.load("/nonexistent/index.faiss")


# ---- sizing -----------------------------------------------------------------------------------------------------------
def test_choose_index_flat_below_a_million_ivf_above_pq_when_tight(capsys):
    choice = choose_index(100_000, 512, 8 << 30)
    assert choice.spec == "Flat" and choice.memory_bytes == 100_000 * (512 * 4 + 8)
    assert "Flat" in capsys.readouterr().out  # the choice is printed
    ivf = choose_index(5_000_000, 512, 16 << 30, verbose=False)
    assert ivf.spec == "IVF8192,Flat" and ivf.nlist == 8192 and 8 <= ivf.nprobe <= 256  # 4 sqrt(5M) = 8944
    pq = choose_index(50_000_000, 512, 2 << 30, verbose=False)
    assert pq.spec == f"IVF{pq.nlist},PQ{pq.pq_bytes}" and pq.memory_bytes <= 2 << 30
    bigger = [
        m for m in (128, 96, 64, 48) if 512 % m == 0 and index_memory("ivf_pq", 50_000_000, 512, pq.nlist, m) <= 2 << 30
    ]
    assert not bigger and pq.pq_bytes == 32  # the largest code that fits: 64 bytes would need 3.4 GiB
    with pytest.raises(ValueError, match="no index for 50,000,000 x 512 fits in 0.25 GiB"):
        choose_index(50_000_000, 512, 1 << 28, verbose=False)
    assert choose_index(2_000_000, 64, 1 << 40, flat_max_n=3_000_000, verbose=False).spec == "Flat"


def test_nlist_is_a_power_of_two_near_4_sqrt_n_with_enough_points_per_cell():
    for n in (1_000, 20_000, 1_000_000, 100_000_000):
        nlist = choose_index(n, 64, 1 << 50, flat_max_n=0, verbose=False).nlist
        assert nlist & (nlist - 1) == 0 and n / nlist >= 39
        assert nlist == 2 ** round(np.log2(4 * np.sqrt(n))) or n / (2 * nlist) < 39


@pytest.mark.parametrize("budget", [1 << 40, pytest.param(60_000, marks=pytest.mark.slow)])  # IVF-Flat, IVF-PQ4
def test_expected_memory_matches_the_filled_index(budget):
    x = data(3_000, 16, seed=3)
    choice = choose_index(len(x), 16, budget, flat_max_n=1_000, verbose=False)
    assert choice.spec == ("IVF64,Flat" if budget == 1 << 40 else "IVF64,PQ4")
    index = choice.create(device="cpu")
    index.train(x)
    index.add(x)
    assert index.nprobe == choice.nprobe
    assert abs(index.memory_bytes() - choice.memory_bytes) / choice.memory_bytes < 0.02


def test_expected_recall_is_measured_on_the_sample():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((64, 32)).astype(np.float32)
    x = centres[rng.integers(0, 64, 12_000)] + 0.05 * rng.standard_normal((12_000, 32)).astype(np.float32)
    assert choose_index(12_000, 32, 1 << 30, sample=x, verbose=False).expected_recall == 1.0  # flat: exact
    ivf = choose_index(2_000_000, 32, 1 << 40, sample=x, verbose=False)
    assert ivf.spec.endswith(",Flat") and 0.9 <= ivf.expected_recall <= 1.0
    with pytest.raises(ValueError, match="sample needs at least"):
        choose_index(2_000_000, 32, 1 << 40, sample=x[:100], verbose=False)
