"""Retriever: search / filters / removal / hubness against brute-force numpy, persistence and crash safety, and
image search with the real lite0-minilm model on emoji images."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from metrank.errors import NotFoundError
from metrank.search import Retriever
from metrank.search.retriever import MANIFEST

DIM = 16


def _unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _metadata(n, offset=0):
    return [{"c": (i + offset) % 7, "s": "ab"[(i + offset) % 2], "rare": (i + offset) % 250 == 3} for i in range(n)]


def _brute(queries, ids, vectors, k, keep=None, bias=None):
    """Reference: exact float64 scores, optional row mask of allowed items and per-item bias."""
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    if bias is not None:
        sims = sims - bias[None, :]
    if keep is not None:
        sims[:, ~keep] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(sims, order):
        idx = idx[np.isfinite(row[idx])]
        out.append((ids[idx], row[idx]))
    return out


def _check_equal(hits_rows, reference):
    for hits, (ref_ids, ref_scores) in zip(hits_rows, reference):
        assert [h.id for h in hits] == ref_ids.tolist()
        np.testing.assert_allclose([h.score for h in hits], ref_scores, atol=1e-5)


@pytest.fixture()
def filled():
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 3000)
    retriever = Retriever.create(dim=DIM)
    ids = retriever.add(vectors=vectors, metadata=_metadata(3000), progress=False)
    return retriever, ids, vectors, rng


def test_search_and_filters_match_brute_force(filled):
    retriever, ids, vectors, rng = filled
    assert ids.tolist() == list(range(3000))
    queries = _unit(rng, 12)
    meta = _metadata(3000)
    c = np.array([m["c"] for m in meta])
    s = np.array([m["s"] for m in meta])
    rare = np.array([m["rare"] for m in meta])
    cases = [
        (None, None),
        ({"c": 3}, c == 3),
        ({"c": [1, 2], "s": "a"}, np.isin(c, [1, 2]) & (s == "a")),
        ({"rare": True}, rare),  # 12 items: answered by exact scoring of the matches
        ({"rare": True, "c": 0}, rare & (c == 0)),
    ]
    for filter, keep in cases:
        got = retriever.search_vectors(queries, k=10, filter=filter)
        _check_equal(got, _brute(queries, ids, vectors, 10, keep))
        if keep is not None:
            assert all(len(row) == min(10, keep.sum()) for row in got)
    assert retriever.search_vectors(queries, k=5, filter={"c": 99}) == [[] for _ in queries]
    # k larger than the gallery returns everything, best first
    small = Retriever.create(dim=DIM)
    small.add(vectors=vectors[:7], progress=False)
    _check_equal(small.search_vectors(queries, k=50), _brute(queries, np.arange(7), vectors[:7], 50))


def test_modalities_remove_and_ids(filled):
    retriever, ids, vectors, rng = filled
    extra = _unit(rng, 50)
    text_ids = retriever.add(vectors=extra, modality="text", metadata=_metadata(50), progress=False)
    assert text_ids.tolist() == list(range(3000, 3050))
    query = _unit(rng, 1)
    got = retriever.search(vector=query[0], k=8, modality="text")
    _check_equal([got], _brute(query, text_ids, extra, 8))
    assert {h.modality for h in got} == {"text"}

    removed = rng.choice(3050, 600, replace=False)
    assert retriever.remove(removed) == 600
    with pytest.raises(NotFoundError, match="unknown ids"):
        retriever.remove([int(removed[0]), 1_000_000])
    assert len(retriever) == 2450
    all_ids = np.arange(3050)
    all_vectors = np.concatenate([vectors, extra])
    alive = ~np.isin(all_ids, removed)
    queries = _unit(rng, 6)
    _check_equal(retriever.search_vectors(queries, k=10), _brute(queries, all_ids, all_vectors, 10, alive))
    meta = _metadata(3000) + _metadata(50)
    c3 = np.array([m["c"] == 3 for m in meta])
    _check_equal(
        retriever.search_vectors(queries, k=10, filter={"c": 3}), _brute(queries, all_ids, all_vectors, 10, alive & c3)
    )
    # new ids never reuse removed ones
    assert retriever.add(vectors=extra[:2], progress=False).tolist() == [3050, 3051]
    item = retriever.get(5 if 5 not in removed else int(all_ids[alive][0]))
    assert item.metadata == meta[item.id] and np.array_equal(item.vector, all_vectors[item.id])
    with pytest.raises(NotFoundError):
        retriever.get(int(removed[0]))


def test_hnsw_removal_rebuilds_and_ivf_needs_training():
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 400)
    hnsw = Retriever.create(dim=DIM, index_spec="HNSW16")
    hnsw.add(vectors=vectors, progress=False)
    assert hnsw.remove(np.arange(0, 400, 2)) == 200
    hits = hnsw.search(vector=vectors[1], k=5)
    assert hits[0].id == 1 and all(h.id % 2 == 1 for h in hits)

    ivf = Retriever.create(dim=DIM, index_spec="IVF4,Flat")
    with pytest.raises(ValueError, match="train"):
        ivf.add(vectors=vectors, progress=False)
    assert len(ivf) == 0 and len(ivf.store) == 0  # nothing half-added
    ivf.train(vectors)
    ivf.add(vectors=vectors, metadata=_metadata(400), progress=False)
    ivf.index.nprobe = 4  # all cells: exact
    queries = _unit(rng, 5)
    c2 = np.array([m["c"] == 2 for m in _metadata(400)])
    _check_equal(ivf.search_vectors(queries, k=10, filter={"c": 2}), _brute(queries, np.arange(400), vectors, 10, c2))


def test_bad_inputs_raise_clear_errors(filled):
    retriever, _, vectors, _ = filled
    with pytest.raises(ValueError, match="dimension"):
        retriever.add(vectors=np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        retriever.search(vector=np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match="already in the index"):
        retriever.add(vectors=vectors[:2], ids=[5, 100000])
    assert len(retriever) == 3000 and 100000 not in retriever.store.existing([100000])
    with pytest.raises(ValueError, match="metadata"):
        retriever.add(vectors=vectors[:2], metadata=[{"a": 1}])
    with pytest.raises(ValueError, match="JSON"):
        retriever.add(vectors=vectors[:1], metadata=[{"a": object()}])
    with pytest.raises(ValueError, match="filter key"):
        retriever.search(vector=vectors[0], filter={"bad key'": 1})
    with pytest.raises(ValueError, match="empty"):
        retriever.search(vector=vectors[0], filter={"c": []})
    with pytest.raises(ValueError, match="exactly one"):
        retriever.search(vector=vectors[0], text="x")
    with pytest.raises(ValueError, match="k must be"):
        retriever.search(vector=vectors[0], k=0)
    with pytest.raises(ValueError, match="no model"):
        retriever.search(text="a cat")


# ------------------------------------------------------------------------------------------------ hubness
def _qb_norm_reference(bank_sims, query_sims, beta):
    """Bogolin et al.'s dynamic inverted softmax, as in their reference code (k = 1 activation set)."""
    activation = np.unique(np.argmax(bank_sims, axis=1))
    normaliser = np.exp(beta * bank_sims).sum(axis=0)
    out = query_sims.copy()
    rows = np.isin(np.argmax(query_sims, axis=1), activation)
    out[rows] = np.exp(beta * query_sims[rows]) / normaliser
    return out, rows


def test_hubness_corrections_match_reference_incrementally():
    rng = np.random.default_rng(2)
    gallery = _unit(rng, 1000)
    gallery[:40] = gallery[:40] * 0.3 + 0.7 * gallery[0]  # a cluster of hubs
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    bank = _unit(rng, 300)
    queries = _unit(rng, 40)
    for method, params in (("qb_norm", {"beta": 20.0}), ("nnn", {"alpha": 0.6, "k": 8})):
        retriever = Retriever.create(dim=DIM)
        retriever.add(vectors=gallery[:600], metadata=_metadata(600), progress=False)
        retriever.set_hubness(method, bank=bank, **params)
        retriever.add(vectors=gallery[600:], metadata=_metadata(400, 600), progress=False)  # incremental
        removed = np.unique(np.concatenate([retriever.hubness.top1_id[:25], np.arange(500, 560)]))
        retriever.remove(removed)  # includes activation-set members: their bank queries are re-searched
        alive = np.setdiff1d(np.arange(1000), removed)
        bank_sims = bank.astype(np.float64) @ gallery[alive].T.astype(np.float64)
        query_sims = queries.astype(np.float64) @ gallery[alive].T.astype(np.float64)
        if method == "qb_norm":
            reference, gated = _qb_norm_reference(bank_sims, query_sims, 20.0)
            assert 0 < gated.sum() < len(queries)  # both branches of the dynamic rule are exercised
            reference[gated] = np.log(reference[gated]) / 20.0  # same order, similarity units
        else:
            top = np.sort(bank_sims, axis=0)[-8:]
            reference = query_sims - 0.6 * top.mean(axis=0)
        order = np.argsort(-reference, axis=1)[:, :10]
        got = retriever.search_vectors(queries, k=10)
        for row, hits in enumerate(got):
            assert [h.id for h in hits] == alive[order[row]].tolist()
            np.testing.assert_allclose([h.score for h in hits], reference[row, order[row]], atol=1e-4)
        plain = retriever.search_vectors(queries, k=10, hubness=False)
        _check_equal(plain, _brute(queries, alive, gallery[alive], 10))
        # with a filter: same correction restricted to the matching items
        c3 = np.array([m["c"] == 3 for m in _metadata(1000)])[alive]
        filtered = retriever.search_vectors(queries, k=5, filter={"c": 3})
        sub_bank, sub_query = bank_sims, query_sims[:, c3]
        if method == "qb_norm":
            gate = np.isin(alive[c3][np.argmax(sub_query, axis=1)], retriever.hubness.top1_id)
            ref = np.where(gate[:, None], sub_query - np.log(np.exp(20 * sub_bank[:, c3]).sum(0)) / 20, sub_query)
        else:
            ref = sub_query - 0.6 * np.sort(sub_bank[:, c3], axis=0)[-8:].mean(axis=0)
        for row, hits in enumerate(filtered):
            assert [h.id for h in hits] == alive[c3][np.argsort(-ref[row])[:5]].tolist()


# ------------------------------------------------------------------------------------------------ persistence
def test_save_load_roundtrip(filled, tmp_path):
    retriever, ids, vectors, rng = filled
    retriever.set_hubness("nnn", bank=_unit(rng, 50), alpha=0.5, k=4)
    retriever.remove([1, 2, 3])
    queries = _unit(rng, 5)
    before = retriever.search_vectors(queries, k=10, filter={"s": "b"})
    retriever.save(str(tmp_path))
    retriever.add(vectors=vectors[:5], progress=False)
    retriever.save()  # same directory again: a new snapshot replaces the old one
    assert sorted(e for e in os.listdir(tmp_path) if not e.startswith("items.sqlite")) == [MANIFEST, "v000002"]
    loaded = Retriever.load(str(tmp_path))
    assert len(loaded) == 3002 and loaded.stats()["hubness"]["method"] == "nnn"
    after = loaded.search_vectors(queries, k=10, filter={"s": "b"})
    assert [[h.id for h in row] for row in after] == [[h.id for h in row] for row in before]
    assert loaded.add(vectors=vectors[:1], progress=False).tolist() == [3005]
    # a corrupted snapshot is refused with a clear message
    with open(tmp_path / "v000002" / "index.faiss", "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(ValueError, match="index.faiss is damaged"):
        Retriever.load(str(tmp_path))


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from metrank.search import Retriever
    directory = sys.argv[1]
    retriever = Retriever.load(directory)  # autocommit: every add/remove is committed before it returns
    rng = np.random.default_rng(int(sys.argv[2]))
    step = 0
    while True:
        vectors = rng.standard_normal((300, 16)).astype(np.float32)
        ids = retriever.add(vectors=vectors, metadata=[{"step": step}] * 300, progress=False)
        print("added", ids[0], ids[-1], flush=True)
        retriever.remove(ids[:10])
        print("removed", ids[0], ids[9], flush=True)
        if step % 3 == 0:
            retriever.save()
        step += 1
""")


@pytest.mark.slow
def test_killed_writer_loses_no_acknowledged_write(tmp_path):
    rng = np.random.default_rng(3)
    base = _unit(rng, 200)
    retriever = Retriever.create(dim=DIM)
    retriever.add(vectors=base, metadata=_metadata(200), progress=False)
    retriever.save(str(tmp_path))
    retriever.close()
    for seed, lines_before_kill in ((0, 3), (1, 8)):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(seed)], stdout=subprocess.PIPE, text=True
        )
        added, removed = [], []
        for _ in range(lines_before_kill):
            kind, first, last = child.stdout.readline().split()
            (added if kind == "added" else removed).extend(range(int(first), int(last) + 1))
        child.send_signal(signal.SIGKILL)  # mid-add, mid-remove or mid-snapshot: whatever it was doing
        child.wait()
        loaded = Retriever.load(str(tmp_path))  # replays the writes after the snapshot; checks index ids == db ids
        stored = set(loaded.store.all_ids().tolist())
        assert set(added) - set(removed) <= stored and not set(removed) & stored
        for i in (0, 57, 199):  # what was saved first is still there, unchanged
            item = loaded.get(i)
            assert np.array_equal(item.vector, base[i]) and item.metadata == _metadata(200)[i]
        ids, vectors = loaded.store.vectors()
        queries = _unit(rng, 3)
        _check_equal(loaded.search_vectors(queries, k=10), _brute(queries, ids, vectors, 10))
        loaded.close()
    loaded = Retriever.load(str(tmp_path))
    loaded.save()
    assert [e for e in os.listdir(tmp_path) if e.endswith(".tmp")] == []  # leftovers of the kills are cleaned


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.data
def test_image_and_text_search_with_lite0_minilm(tmp_path):
    from metrank.data import create_dataset
    from metrank.encoders import create_model

    data = create_dataset("emoji", split="test")
    google = [i for i, v in enumerate(data.image_views) if v == "google"][:12]
    twitter = [i for i, v in enumerate(data.image_views) if v == "twitter"][:12]
    retriever = Retriever.create(  # 64 px emoji: 128 px input
        model=create_model("lite0-minilm", image_size=128), media_roots=[os.path.dirname(data.images[google[0]])]
    )
    image_ids = retriever.add(
        images=[data.images[i] for i in google],
        progress=False,
        metadata=[{"name": data.captions[i], "label": int(data.image_labels[i])} for i in google],
    )
    text_ids = retriever.add(texts=[data.captions[i] for i in google], progress=False)
    model = retriever.model  # the reference embeddings below come straight from the model, in two batched calls
    both = model.embed_images([data.images[i] for i in google + twitter], progress=False)
    gallery, queries = both[:12], both[12:]
    texts = model.embed_texts(["smiling face"] + [data.captions[i] for i in google], progress=False)
    text_query, captions = texts[:1], texts[1:]
    hits = retriever.search(image=data.images[twitter[0]], k=5, modality="image")
    _check_equal([hits], _brute(queries[:1], image_ids, gallery, 5))
    # text -> image and image -> text against brute force with the model's own embeddings
    by_text = retriever.search(text="smiling face", k=5, modality="image")
    _check_equal([by_text], _brute(text_query, image_ids, gallery, 5))
    _check_equal(
        [retriever.search(image=data.images[google[0]], k=5, modality="text")],
        _brute(gallery[:1], text_ids, captions, 5),
    )
    # image -> same image: top-1 is itself; cross-vendor instance retrieval with frozen towers finds the same emoji
    # far above chance (1/12)
    assert [row[0].id for row in retriever.search_vectors(gallery, k=1, modality="image")] == image_ids.tolist()
    top1 = [row[0].metadata["label"] for row in retriever.search_vectors(queries, k=1, modality="image")]
    assert np.mean(np.array(top1) == data.image_labels[twitter]) >= 0.5
    retriever.save(str(tmp_path))
    loaded = Retriever.load(str(tmp_path))  # rebuilds the very same model from the saved checkpoint
    assert [h.id for h in loaded.search(text="smiling face", k=5, modality="image")] == [h.id for h in by_text]


# ------------------------------------------------------------------------------------------------ command line
def test_cli_index_and_search(tmp_path, capsys):
    import argparse
    import json

    from metrank.commands import search as search_command

    parser = argparse.ArgumentParser(prog="metrank")
    search_command.register(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    rng = np.random.default_rng(4)
    vectors = _unit(rng, 300)
    np.save(tmp_path / "emb.npy", vectors)
    with open(tmp_path / "emb.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"id": i, "text": f"caption {i}", "metadata": {"c": i % 4}}) + "\n")
    assert (
        run(
            "index",
            tmp_path / "idx",
            "--vectors",
            tmp_path / "emb.npy",
            "--items",
            tmp_path / "emb.jsonl",
            "--hubness",
            "nnn",
            "--bank",
            tmp_path / "emb.npy",
            "--hubness-param",
            "alpha=0.5",
        )
        == 0
    )
    np.save(tmp_path / "q.npy", vectors[7])
    capsys.readouterr()
    assert (
        run(
            "search",
            tmp_path / "idx",
            "--vector",
            tmp_path / "q.npy",
            "-k",
            "4",
            "--filter",
            "c=3",
            "--filter",
            "c=1",
            "--no-hubness",
            "--json",
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    keep = np.isin(np.arange(300) % 4, [1, 3])
    ref_ids, ref_scores = _brute(vectors[7:8], np.arange(300), vectors, 4, keep)[0]
    assert [h["id"] for h in hits] == ref_ids.tolist()
    np.testing.assert_allclose([h["score"] for h in hits], ref_scores, atol=1e-5)
    assert all(h["modality"] == "text" and h["text"] == f"caption {h['id']}" for h in hits)
    assert run("search", tmp_path / "idx", "--vector=" + ",".join(map(str, vectors[5])), "-k", "2") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["rank", "id", "score", "modality"] and table[1].split()[1] == "5"
    with pytest.raises(ValueError, match="dimension"):
        run("search", tmp_path / "idx", "--vector", "0.1,0.2")
    with pytest.raises(ValueError, match="key=value"):
        run("search", tmp_path / "idx", "--vector", tmp_path / "q.npy", "--filter", "c")
    assert Retriever.load(str(tmp_path / "idx")).stats()["hubness"]["alpha"] == 0.5
