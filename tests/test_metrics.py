"""Metrics against a brute-force numpy reference (ties included), hand-computed cases and pytorch-metric-learning."""

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

import metrank.metrics as metrics
from metrank.metrics import (
    coco_1k_folds,
    combine_rank_counts,
    first_relevant_rank,
    format_table,
    image_text_metrics,
    knn,
    merge_relevant_items,
    metrics_from_ranks,
    ranks_from_counts,
    relevant_ranks,
    retrieval_metrics,
    shard_rank_counts,
    shard_relevant_items,
)


# ---- brute-force reference: full score matrix, np.lexsort ranking (score, then lower index) -------------------------
def reference_ranking(query, gallery, metric="ip", leave_one_out=False):
    q, g = query.astype(np.float64), gallery.astype(np.float64)
    scores = q @ g.T if metric == "ip" else -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    orders = []
    for i, row in enumerate(scores):
        order = np.lexsort((np.arange(len(g)), -row))
        orders.append(order[order != i] if leave_one_out else order)
    return scores, orders


def reference_retrieval(query, labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8), metric="ip"):
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, labels
    _, orders = reference_ranking(query, gallery, metric, leave_one_out)
    per_query = []
    for i, order in enumerate(orders):
        rel = (gallery_labels[order] == labels[i]).astype(float)
        r = int(rel.sum())
        if r == 0:
            continue
        row = {f"R@{k}": float(rel[:k].any()) for k in ks}
        row.update({f"P@{k}": rel[:k].sum() / k for k in ks})
        row["MAP@R"] = sum(rel[: i + 1].sum() / (i + 1) for i in range(r) if rel[i]) / r
        row["R-precision"] = rel[:r].sum() / r
        per_query.append(row)
    out = {key: float(np.mean([row[key] for row in per_query])) for key in per_query[0]}
    return out, len(query) - len(per_query)


def reference_first_rank(query, query_labels, gallery, gallery_labels):
    _, orders = reference_ranking(query, gallery)
    return np.array([int(np.flatnonzero(gallery_labels[o] == query_labels[i])[0]) for i, o in enumerate(orders)])


def quantised(rng, n, d, levels=2):
    """Small-integer embeddings: exact float32 dot products and many exactly tied scores."""
    return rng.integers(-levels, levels + 1, size=(n, d)).astype(np.float32)


def assert_same_metrics(ours, expected):
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


# ---- exact k-NN -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("levels", [1, 40])  # 1: almost every row tied; 40: few ties, FAISS order mostly kept
def test_knn_matches_lexsort_reference_including_ties(metric, levels):
    rng = np.random.default_rng(levels)
    query, gallery = quantised(rng, 150, 6, levels), quantised(rng, 400, 6, levels)
    gallery[200:260] = gallery[:60]  # exact duplicates
    scores, ids = knn(query, gallery, k=25, metric=metric, chunk_size=37)
    ref_scores, orders = reference_ranking(query, gallery, metric)
    ref_ids = np.stack([o[:25] for o in orders])
    np.testing.assert_array_equal(ids, ref_ids)
    expected = np.take_along_axis(ref_scores, ref_ids, 1)
    np.testing.assert_array_equal(scores, expected if metric == "ip" else -expected)


def test_knn_leave_one_out_skips_self_and_pads_past_gallery():
    rng = np.random.default_rng(1)
    x = quantised(rng, 30, 4)
    x[10] = x[11]  # the query's twin ties with itself; the twin must still be returned, the query never
    scores, ids = knn(x, k=40, chunk_size=7)
    _, orders = reference_ranking(x, x, leave_one_out=True)
    np.testing.assert_array_equal(ids[:, :29], np.stack(orders))
    assert (ids[:, 29:] == -1).all() and np.isneginf(scores[:, 29:]).all()
    assert not (ids == np.arange(30)[:, None]).any()


def test_identical_gallery_vectors_tie_despite_blas_rounding():
    # FAISS/BLAS may round the same dot product differently in the last gallery columns (edge kernels): with these
    # sizes raw IndexFlatIP scores row 5002 differently from its copy at row 7 for most queries. Copies must tie.
    rng = np.random.default_rng(8)
    gallery = rng.standard_normal((5003, 64)).astype(np.float32)
    gallery[5002] = gallery[7]
    query = (gallery[7] + 0.1 * rng.standard_normal((4500, 64))).astype(np.float32)
    scores, ids = knn(query, gallery, k=3)
    assert (ids[:, :2] == [7, 5002]).all() and (scores[:, 0] == scores[:, 1]).all()
    only_copy_relevant = (np.arange(5003) != 5002).astype(np.int64)
    ranks = first_relevant_rank(query, np.zeros(4500, np.int64), gallery, only_copy_relevant)
    assert (ranks == 1).all()


# ---- rank counting --------------------------------------------------------------------------------------------------
def reference_ranks(query, labels, gallery=None, gallery_labels=None, metric="ip"):
    """Brute force: 0-based positions of each query's relevant items in its lexsort order (a list per query)."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, labels
    _, orders = reference_ranking(query, gallery, metric, leave_one_out)
    return [np.flatnonzero(gallery_labels[order] == labels[i]) for i, order in enumerate(orders)]


def assert_ranks_equal(ranks, n_relevant, expected, limit=None):
    for i, ref in enumerate(expected):
        kept = ref if limit is None else ref[:limit]
        assert n_relevant[i] == len(ref)
        np.testing.assert_array_equal(ranks[i, : len(kept)], kept, err_msg=f"query {i}")
        assert (ranks[i, len(kept) :] == -1).all()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny GEMM tiles, so that every test crosses many tile boundaries in both directions."""
    monkeypatch.setattr(metrics, "TILE_COLUMNS", 23)
    monkeypatch.setattr(metrics, "TILE_ROWS", 17)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("levels", [1, 3])  # 1: almost every score tied; 3: fewer ties
def test_relevant_ranks_match_brute_force_with_ties_duplicates_and_singletons(small_tiles, metric, levels):
    rng = np.random.default_rng(20 + levels)
    x = quantised(rng, 160, 4, levels)
    x[100:130] = x[:30]  # exact duplicates, some of them across labels
    labels = rng.integers(0, 25, 160)
    labels[:3] = [500, 501, 502]  # singletons: no relevant item in leave-one-out
    ranks, n_relevant = relevant_ranks(x, labels, metric=metric, chunk_size=41)
    assert_ranks_equal(ranks, n_relevant, reference_ranks(x, labels, metric=metric))
    assert (n_relevant[:3] == 0).all() and (ranks[:3] == -1).all()
    gallery, g_labels = x[:70], labels[:70]
    ranks, n_relevant = relevant_ranks(x[70:], labels[70:], gallery, g_labels, limit=3, metric=metric)
    assert_ranks_equal(ranks, n_relevant, reference_ranks(x[70:], labels[70:], gallery, g_labels, metric), limit=3)


@pytest.fixture(params=["dense", "grouped", "grouped, binary search"])
def scan(request, monkeypatch):
    """Every way a score tile is scanned: entry by entry or by group maxima first (GROUP-wide groups), candidates
    compared with each relevant item or by binary search."""
    monkeypatch.setattr(metrics, "TILE_ROWS", 16 if request.param != "dense" else 17)
    monkeypatch.setattr(metrics, "TILE_COLUMNS", 23 if request.param == "dense" else 32)
    monkeypatch.setattr(metrics, "GROUP", 4)
    monkeypatch.setattr(metrics, "DIRECT_WIDTH", 0 if "binary" in request.param else 8)


def capped(reference, cap, limit=None):
    """Brute-force ranks clipped the way ``rank_cap`` reports them: at max(cap, kept relevant items)."""
    return [np.minimum(ref, max(cap, len(ref) if limit is None else min(len(ref), limit))) for ref in reference]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("cap", [1, 3, 40])
def test_rank_cap_clips_ranks_exactly_and_shards_still_add_up(scan, metric, cap):
    rng = np.random.default_rng(30 + cap)
    x = quantised(rng, 150, 4, 2)
    x[100:120] = x[:20]
    labels = rng.integers(0, 12, 150)
    ranks, n_relevant = relevant_ranks(x, labels, metric=metric, rank_cap=cap, chunk_size=53)
    expected = capped(reference_ranks(x, labels, metric=metric), cap)
    assert_ranks_equal(ranks, n_relevant, expected)
    uncapped, _ = relevant_ranks(x, labels, metric=metric)
    assert_ranks_equal(uncapped, n_relevant, reference_ranks(x, labels, metric=metric))
    # sharded: each shard saturates on its own counts; the clipped sum is the single-process answer
    query, q_labels, gallery, g_labels = x[:60], labels[:60], x[60:], labels[60:]
    bounds = [0, 30, 31, 90]
    shards = [(lo, gallery[lo:hi], g_labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for limit in (None, 2):
        relevant = merge_relevant_items(
            [shard_relevant_items(query, q_labels, g, lab, lo, metric=metric, limit=limit) for lo, g, lab in shards],
            limit,
        )
        counts = combine_rank_counts(
            [shard_rank_counts(query, relevant, g, lo, metric=metric, rank_cap=cap) for lo, g, _ in shards]
        )
        ranks = ranks_from_counts(relevant, counts, rank_cap=cap)
        reference = capped(reference_ranks(query, q_labels, gallery, g_labels, metric), cap, limit)
        assert_ranks_equal(ranks, relevant.n_relevant, reference, limit=limit)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_leave_one_out_symmetric_pass_matches_brute_force(scan, metric):
    # leave-one-out scores each tile of x x^T once and counts it for both its rows and its columns; with a limit the
    # kept relevant items are not symmetric (j kept for i, i cut off for j), which the transposed count must respect
    rng = np.random.default_rng(41)
    x = quantised(rng, 200, 4, 1)  # almost every score tied
    x[150:170] = x[:20]
    labels = rng.integers(0, 30, 200)
    reference = reference_ranks(x, labels, metric=metric)
    for limit in (None, 2):
        ranks, n_relevant = relevant_ranks(x, labels, limit=limit, metric=metric)
        assert_ranks_equal(ranks, n_relevant, reference, limit=limit)
        general, _ = relevant_ranks(x, labels, limit=limit, metric=metric, chunk_size=64)  # row blocks, all columns
        np.testing.assert_array_equal(general, ranks)


def test_ranks_have_no_k_cap_and_match_brute_force_deep_in_the_gallery():
    # the only relevant item sits behind thousands of others: far past any top-k cut (FAISS GPU stops at 2048)
    rng = np.random.default_rng(9)
    gallery = rng.standard_normal((6000, 8)).astype(np.float32)
    query = rng.standard_normal((5, 8)).astype(np.float32)
    g_labels = np.ones(6000, np.int64)
    scores = query.astype(np.float64) @ gallery.T.astype(np.float64)
    deep = np.argsort(-scores, axis=1, kind="stable")[:, 4000]  # the item at rank 4000 of each query
    g_labels[deep] = np.arange(5) + 10
    ranks = first_relevant_rank(query, np.arange(5) + 10, gallery, g_labels)
    np.testing.assert_array_equal(ranks, reference_first_rank(query, np.arange(5) + 10, gallery, g_labels))
    assert (ranks == 4000).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_shard_counts_add_up_to_the_single_process_ranks(small_tiles, metric):
    rng = np.random.default_rng(10)
    query, gallery = quantised(rng, 90, 5, 1), quantised(rng, 200, 5, 1)
    gallery[150:170] = gallery[10:30]  # duplicates in another shard than their originals
    q_labels, g_labels = rng.integers(0, 12, 90), rng.integers(0, 10, 200)
    bounds = [0, 37, 38, 121, 200]  # uneven shards, one of a single row
    shards = [(lo, gallery[lo:hi], g_labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for limit in (None, 2):
        parts = [
            shard_relevant_items(query, q_labels, g, lab, offset=lo, metric=metric, limit=limit)
            for lo, g, lab in shards
        ]
        relevant = merge_relevant_items(parts, limit=limit)
        counts = combine_rank_counts(
            [shard_rank_counts(query, relevant, g, offset=lo, metric=metric) for lo, g, _ in shards]
        )
        ranks = ranks_from_counts(relevant, counts)
        single, n_relevant = relevant_ranks(query, q_labels, gallery, g_labels, limit=limit, metric=metric)
        np.testing.assert_array_equal(ranks, single)
        np.testing.assert_array_equal(relevant.n_relevant, n_relevant)
        assert_ranks_equal(ranks, n_relevant, reference_ranks(query, q_labels, gallery, g_labels, metric), limit=limit)
        if limit is None:  # the metrics from the combined counts: those of the brute-force reference
            expected, _ = reference_retrieval(query, q_labels, gallery, g_labels, ks=(1, 4, 300), metric=metric)
            with pytest.warns(UserWarning, match="no relevant gallery item"):
                assert_same_metrics(metrics_from_ranks(ranks, relevant.n_relevant, (1, 4, 300)), expected)


def test_shard_leave_one_out_uses_the_query_index():
    rng = np.random.default_rng(11)
    x, labels = quantised(rng, 60, 3, 1), rng.integers(0, 6, 60)
    shards = [(0, x[:25], labels[:25]), (25, x[25:], labels[25:])]
    own = np.arange(60)
    relevant = merge_relevant_items([shard_relevant_items(x, labels, g, lab, lo, own) for lo, g, lab in shards])
    counts = combine_rank_counts([shard_rank_counts(x, relevant, g, lo, own) for lo, g, _ in shards])
    single, _ = relevant_ranks(x, labels)
    np.testing.assert_array_equal(ranks_from_counts(relevant, counts), single)


def test_rank_count_parts_must_fit_together():
    with pytest.raises(ValueError, match="different shapes"):
        combine_rank_counts([np.zeros((3, 2), np.int64), np.zeros((3, 1), np.int64)])
    x = np.eye(3, dtype=np.float32)
    a = shard_relevant_items(x, np.arange(3), x, np.arange(3))
    b = shard_relevant_items(x[:2], np.arange(2), x, np.arange(3))
    with pytest.raises(ValueError, match="different numbers of queries"):
        merge_relevant_items([a, b])
    with pytest.raises(ValueError, match="relevant items are for 3 queries"):
        shard_rank_counts(x[:2], a, x)
    with pytest.raises(ValueError, match="dimension"):
        shard_rank_counts(x, a, np.ones((4, 5), np.float32))


# ---- class-label retrieval ------------------------------------------------------------------------------------------
def test_retrieval_hand_computed_ties_break_to_lower_index():
    # scores of query 0 ([1, 0]): g0=0, g1=1, g2=1, g3=1 -> order g1, g2, g3, g0 -> relevant [0, 0, 1, 1], R = 2
    # scores of query 1 ([0, 1]): g0=1, g1=0, g2=5, g3=-3 -> order g2, g0, g1, g3 -> relevant [1, 0, 1, 0], R = 2
    query = np.array([[1, 0], [0, 1]], np.float32)
    gallery = np.array([[0, 1], [1, 0], [1, 5], [1, -3]], np.float32)
    out = retrieval_metrics(query, np.array([1, 0]), gallery, np.array([1, 0, 0, 1]), ks=(1, 2, 4))
    expected = {
        "R@1": 0.5,
        "R@2": 0.5,
        "R@4": 1.0,
        "P@1": 0.5,
        "P@2": 0.25,
        "P@4": 0.5,
        "MAP@R": 0.25,
        "R-precision": 0.25,
        "n_queries": 2,
        "n_queries_no_relevant": 0,
    }
    assert out == pytest.approx(expected)


def test_retrieval_hand_computed_leave_one_out_l2_with_lone_class():
    # points on a line 0, 1, 3, 7 (labels A B A B) and a lone C at 100. Neighbour orders without self:
    # q0: 1(B) 3(A) 7(B) | q1: 0(A) 3(A) 7(B) | q2: 1(B) 0(A) 7(B) | q3: 3(A) 1(B) 0(A); first hits at 2, 3, 2, 2;
    # one relevant item each (R = 1) so MAP@R = R-precision = 0; P@2 = (1 + 0 + 1 + 1) / 2 / 4, P@3 = 1/3 for all
    x = np.array([[0], [1], [3], [7], [100]], np.float32)
    with pytest.warns(UserWarning, match="1 of 5 queries"):
        out = retrieval_metrics(x, np.array([0, 1, 0, 1, 2]), ks=(1, 2, 3), metric="l2")
    expected = {
        "R@1": 0.0,
        "R@2": 0.75,
        "R@3": 1.0,
        "P@1": 0.0,
        "P@2": 0.375,
        "P@3": 1 / 3,
        "MAP@R": 0.0,
        "R-precision": 0.0,
        "n_queries": 4,
        "n_queries_no_relevant": 1,
    }
    assert out == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("levels, dim", [(2, 5), (1, 3)])  # (1, 3): 27 distinct vectors, heavily duplicated
def test_retrieval_leave_one_out_matches_reference(metric, levels, dim):
    rng = np.random.default_rng(2)
    x = quantised(rng, 300, dim, levels)
    labels = rng.integers(0, 60, 300)
    labels[:4] = [1000, 1001, 1002, 1003]  # classes of size 1
    with pytest.warns(UserWarning):
        out = retrieval_metrics(x, labels, ks=(1, 3, 10, 500), metric=metric, chunk_size=64)
    expected, n_lone = reference_retrieval(x, labels, ks=(1, 3, 10, 500), metric=metric)
    assert_same_metrics(out, expected)
    assert out["n_queries_no_relevant"] == n_lone >= 4 and out["n_queries"] == 300 - n_lone


def test_retrieval_query_gallery_matches_reference_with_k_beyond_gallery():
    rng = np.random.default_rng(3)
    query, gallery = quantised(rng, 120, 4), quantised(rng, 40, 4)
    q_labels, g_labels = rng.integers(0, 12, 120), rng.integers(0, 10, 40)  # labels 10, 11: no match in gallery
    with pytest.warns(UserWarning):
        out = retrieval_metrics(query, q_labels, gallery, g_labels, ks=(1, 5, 64), chunk_size=50)
    expected, n_lone = reference_retrieval(query, q_labels, gallery, g_labels, ks=(1, 5, 64))
    assert_same_metrics(out, expected)
    assert out["R@64"] == 1.0 and out["n_queries_no_relevant"] == n_lone > 0


def test_retrieval_accepts_torch_and_float64_and_skips_map():
    rng = np.random.default_rng(4)
    x = quantised(rng, 80, 4).astype(np.float64)
    labels = np.repeat(np.arange(16), 5)
    ours = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels), ks=(1, 4), map_at_r=False)
    expected, _ = reference_retrieval(x, labels, ks=(1, 4))
    assert "MAP@R" not in ours and ours["R@4"] == pytest.approx(expected["R@4"], abs=1e-12)


@pytest.mark.parametrize("separate_gallery", [False, True])
def test_parity_with_pytorch_metric_learning(separate_gallery):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 120, 700)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    split = 300 if separate_gallery else None
    pml = calculator.get_accuracy(x[:split], labels[:split], *((x[split:], labels[split:]) if split else ()))
    with pytest.warns(UserWarning, match="no relevant gallery item"):  # lone queries: excluded, as in PML
        ours = retrieval_metrics(x[:split], labels[:split], *((x[split:], labels[split:]) if split else ()), ks=(1,))
    assert ours["P@1"] == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-9)
    assert ours["R-precision"] == pytest.approx(pml["r_precision"], abs=1e-9)


def test_retrieval_bad_input_raises_value_error():
    x = np.ones((10, 4), np.float32)
    labels = np.arange(10)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, labels)
    with pytest.raises(ValueError, match="length 9"):
        retrieval_metrics(x, labels[:9])
    with pytest.raises(ValueError, match="floating dtype"):
        retrieval_metrics(x.astype(np.int64), labels)
    with pytest.raises(ValueError, match="integer dtype"):
        retrieval_metrics(x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.ones((0, 4), np.float32), labels[:0])
    with pytest.raises(ValueError, match="dimension 5"):
        retrieval_metrics(x, labels, np.ones((3, 5), np.float32), np.arange(3))
    with pytest.raises(ValueError, match="both gallery and gallery_labels"):
        retrieval_metrics(x, labels, gallery=x)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, labels, ks=(0,))


# ---- image-text -----------------------------------------------------------------------------------------------------
def test_image_text_hand_computed():
    # images: i0=[1,0], i1=[0,1]; captions t0=[0,1] and t1=[1,0] describe i0, t2=[1,1] describes i1
    # i2t: i0 scores t0..t2 = 0,1,1 -> t1 first (tie with t2 broken by index): rank 0; i1: 1,0,1 -> t0, t2: rank 1
    # t2i: t0 -> i1 ahead of i0: rank 1; t1 -> rank 0; t2 ties (1, 1) -> i0 first: rank 1
    images = np.array([[1, 0], [0, 1]], np.float32)
    texts = np.array([[0, 1], [1, 0], [1, 1]], np.float32)
    out = image_text_metrics(images, texts, np.array([0, 0, 1]))
    expected = {
        "i2t_R@1": 50.0,
        "i2t_R@5": 100.0,
        "i2t_R@10": 100.0,
        "i2t_medr": 1.0,
        "i2t_meanr": 1.5,
        "t2i_R@1": 100 / 3,
        "t2i_R@5": 100.0,
        "t2i_R@10": 100.0,
        "t2i_medr": 2.0,
        "t2i_meanr": 5 / 3,
        "rsum": 50 + 200 + 100 / 3 + 200,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def image_text_reference(images, texts, ids, ks=(1, 5, 10), image_labels=None):
    image_labels = np.arange(len(images)) if image_labels is None else image_labels
    out = {}
    for prefix, ranks in (
        ("i2t", reference_first_rank(images, image_labels, texts, image_labels[ids])),
        ("t2i", reference_first_rank(texts, image_labels[ids], images, image_labels)),
    ):
        out.update({f"{prefix}_R@{k}": 100 * np.mean(ranks < k) for k in ks})
        out[f"{prefix}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{prefix}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{p}_R@{k}"] for p in ("i2t", "t2i") for k in ks)
    return out


@pytest.mark.parametrize("with_labels", [False, True])
def test_image_text_matches_reference_with_several_captions(with_labels):
    rng = np.random.default_rng(6)
    images = quantised(rng, 60, 5)
    ids = np.concatenate([np.repeat(np.arange(60), 5), rng.integers(0, 60, 7)])  # 5 captions each, some have 6
    texts = images[ids] + quantised(rng, len(ids), 5, levels=1)
    labels = rng.integers(0, 40, 60) if with_labels else None
    out = image_text_metrics(images, texts, ids, image_labels=labels)
    for key, value in image_text_reference(images, texts, ids, image_labels=labels).items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    ranks = first_relevant_rank(texts, ids, images, np.arange(60), chunk_size=13)
    np.testing.assert_array_equal(ranks, reference_first_rank(texts, ids, images, np.arange(60)))


def test_coco_1k_folds_average_the_folds():
    rng = np.random.default_rng(7)
    images = quantised(rng, 100, 4)
    ids = np.repeat(np.arange(100), 5)
    texts = images[ids] + quantised(rng, 500, 4, levels=1)
    out = coco_1k_folds(images, texts, ids, n_folds=5, fold_size=20)
    folds = [
        image_text_reference(images[f * 20 : (f + 1) * 20], texts[f * 100 : (f + 1) * 100], ids[:100] % 20)
        for f in range(5)
    ]
    for key in folds[0]:
        assert out[key] == pytest.approx(np.mean([fold[key] for fold in folds]), abs=1e-9), key
    with pytest.raises(ValueError, match="need 1000 images"):
        coco_1k_folds(images, texts, ids, n_folds=5, fold_size=200)


def test_image_text_bad_ids():
    images, texts = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="must index image_emb"):
        image_text_metrics(images, texts, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="length 2"):
        image_text_metrics(images, texts, np.array([0, 1]))


def test_format_table_lists_every_metric():
    table = format_table([{"R@1": 0.5, "n_queries": 4}, {"R@1": 0.25, "rsum": 512.333}], names=["a", "bb"])
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "n_queries", "rsum"]
    assert lines[2].split() == ["a", "0.5000", "4"] and lines[3].split() == ["bb", "0.2500", "512.33"]
    with pytest.raises(ValueError, match="2 result rows"):
        format_table([{"a": 1}, {"a": 2}], names=["x"])
