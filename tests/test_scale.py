"""metrank.scale on a real local Ray cluster (2 CPUs): sharded evaluation, index build, embedding and training
against their single-process counterparts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_metric_learning.utils.inference  # noqa: F401  (patches faiss for torch, as every PML user has it)

ray = pytest.importorskip("ray")

from metrank.metrics import image_text_metrics, retrieval_metrics  # noqa: E402

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


def test_sharded_image_text_metrics_equal_single_process_metrics(ray_cluster):
    from metrank.scale.evaluate import image_text_metrics as sharded_image_text_metrics

    rng = np.random.default_rng(3)
    images, _ = clustered(90, 12, 30, seed=3)
    images[60:70] = images[:10]  # duplicate images: exact ties across image shards
    text_image_ids = np.r_[np.repeat(np.arange(80), 3), rng.integers(0, 80, 50)]  # 3-4 captions each; 80..89 none
    texts = images[text_image_ids] + 0.3 * rng.standard_normal((len(text_image_ids), 12)).astype(np.float32)
    texts[::7] = texts[1::7][: len(texts[::7])]  # duplicate captions: ties across caption shards
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    image_labels = np.arange(90) // 2  # pairs of interchangeable images
    for labels, n_shards in ((None, 3), (image_labels, 2)):
        with pytest.warns(UserWarning, match="10 images have no caption"):
            expected = image_text_metrics(images, texts, text_image_ids, ks=(1, 5, 100), image_labels=labels)
        with pytest.warns(UserWarning, match="10 images have no caption"):
            got = sharded_image_text_metrics(
                images, texts, text_image_ids, ks=(1, 5, 100), image_labels=labels, n_shards=n_shards, query_chunk=41
            )
        assert got == expected
    assert expected["n_images_no_caption"] == 10 and 0 < expected["t2i_R@1"] < 100
    with pytest.raises(ValueError, match="text_image_ids must index image_emb rows"):
        sharded_image_text_metrics(images, texts, text_image_ids + 11)


# ---- sharded index build ---------------------------------------------------------------------------------------------
def write_shards(folder, x, bounds, ids=None):
    from metrank.scale.shards import write_shard

    ids = np.arange(len(x)) if ids is None else ids
    folder.mkdir(exist_ok=True)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_shard(str(folder / f"shard-{k:05d}.parquet"), ids[lo:hi], x[lo:hi], [f"item {i}" for i in ids[lo:hi]])
    return folder


def test_merged_sharded_ivf_index_equals_one_built_in_one_process(ray_cluster, tmp_path):
    from metrank.errors import StateError
    from metrank.index import create_index
    from metrank.scale.index import build_index, load_index, to_retriever
    from metrank.search import Retriever

    x, _ = clustered(3000, 16, 40, seed=1)
    shards = write_shards(tmp_path / "emb", x, [0, 1200, 1201, 3000])
    merged = build_index(str(shards), str(tmp_path / "index"), spec="IVF32,Flat", train_size=10_000)
    single = create_index("IVF32,Flat", 16, device="cpu")
    single.train(x, max_train=None)  # the build trained on every vector too (train_size >= N), in shard order
    on_disk = build_index(str(shards), str(tmp_path / "ondisk"), on_disk=True, trained=single)  # its quantiser
    assert sorted(p.name for p in (tmp_path / "ondisk").iterdir()) == ["COMPLETE.json", "index.faiss", "index.ivfdata"]
    assert (tmp_path / "ondisk" / "index.faiss").stat().st_size < 10_000  # quantiser and list offsets only
    single.add(x, np.arange(len(x)))
    loaded = load_index(str(tmp_path / "index"), device="cpu")
    (tmp_path / "ondisk").rename(tmp_path / "moved")  # the lists are mapped from the folder the index is in
    on_disk_loaded = load_index(str(tmp_path / "moved"), device="cpu")
    for index in (merged, loaded, on_disk, on_disk_loaded):
        index.nprobe = single.nprobe = 4
        scores, ids = index.search(x[:300], 10)
        expected_scores, expected_ids = single.search(x[:300], 10)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)
    assert loaded.ntotal == on_disk_loaded.ntotal == 3000
    for folder in ("index", "moved"):
        retriever = to_retriever(str(tmp_path / folder), device="cpu")  # the merged index serves searches
        retriever.index.nprobe = 4
        hits = retriever.search_vectors(x[:5], k=10, hubness=False)
        np.testing.assert_array_equal([[h.id for h in row] for row in hits], expected_ids[:5])
        assert hits[0][0].text is None and retriever.get(int(expected_ids[0, 0])).id == expected_ids[0, 0]
        retriever.save(str(tmp_path / f"served-{folder}"))
        served = Retriever.load(str(tmp_path / f"served-{folder}"), device="cpu")
        served.index.nprobe = 4
        assert len(served) == 3000
        np.testing.assert_array_equal(served.index.search(x[:300], 10)[1], expected_ids)
    # a served on-disk build owns its copy of the lists (beside its index.faiss) and refuses adds, never touching the
    # build: the build folder can go, and nothing acknowledged is half-written
    lists = (tmp_path / "moved" / "index.ivfdata").read_bytes()
    served = Retriever.load(str(tmp_path / "served-moved"), device="cpu")
    with pytest.raises(StateError, match="read-only"):
        served.add(vectors=x[:2], ids=[5000, 5001])
    assert (tmp_path / "moved" / "index.ivfdata").read_bytes() == lists and len(served) == 3000
    shutil.rmtree(tmp_path / "moved")
    served = Retriever.load(str(tmp_path / "served-moved"), device="cpu")
    served.index.nprobe = 4
    np.testing.assert_array_equal(served.index.search(x[:300], 10)[1], expected_ids)


def test_sharded_index_bad_input_and_interrupted_build(ray_cluster, tmp_path):
    from metrank.errors import ConfigError, InputError, StateError
    from metrank.index import create_index
    from metrank.scale.index import IVFDATA_FILE, MARKER, PARTS_DIR, build_index, load_index
    from metrank.scale.shards import write_shard

    x, _ = clustered(400, 8, 10, seed=2)
    duplicated = write_shards(tmp_path / "dup", x, [0, 200, 400], ids=np.r_[np.arange(200), np.arange(150, 350)])
    mixed = write_shards(tmp_path / "mixed", x, [0, 200, 400])
    write_shard(str(mixed / "shard-00001.parquet"), np.arange(200, 400), np.ones((200, 6), np.float32), ["x"] * 200)
    for on_disk in (False, True):
        with pytest.raises(InputError, match="ids occur in more than one row"):
            build_index(str(duplicated), str(tmp_path / "i1"), spec="IVF4,Flat", on_disk=on_disk)
        with pytest.raises(InputError, match="dimension 6 but the other shards have 8"):
            build_index(str(mixed), str(tmp_path / "i2"), spec="IVF4,Flat", on_disk=on_disk)
    good = write_shards(tmp_path / "good", x, [0, 200, 400])
    for spec in ("Flat", "HNSW8", "IVF4,PQ2x4,RFlat"):  # RFlat: a refine wrapper, whose flat copy is in RAM
        with pytest.raises(ConfigError, match="on_disk needs an IVF index .* build it in memory"):
            build_index(str(good), str(tmp_path / "i3"), spec=spec, on_disk=True)
    flat = build_index(str(good), str(tmp_path / "i3"), spec="Flat")
    assert load_index(str(tmp_path / "i3"), device="cpu").ntotal == 400
    with pytest.raises(InputError, match="trained must be a trained, empty index"):
        build_index(str(good), str(tmp_path / "i5"), trained=flat)
    with pytest.raises(InputError, match="dimension 8 but the other shards have 6"):
        build_index(str(good), str(tmp_path / "i5"), trained=create_index("Flat", 6))
    (tmp_path / "i3" / MARKER).unlink()  # as if the build had been killed before its last step
    with pytest.raises(StateError, match="no finished index"):
        load_index(str(tmp_path / "i3"))
    (tmp_path / "i4" / PARTS_DIR).mkdir(parents=True)
    (tmp_path / "i4" / PARTS_DIR / "part-00007.faiss").write_bytes(b"left by a killed build")
    index = build_index(str(good), str(tmp_path / "i4"), spec="IVF4,Flat", on_disk=True)
    assert not (tmp_path / "i4" / PARTS_DIR).exists() and index.ntotal == 400
    with pytest.raises(StateError, match="read-only .* rebuild"):  # FAISS would abort the process
        index.add(x[:2], np.array([1000, 1001]))
    with pytest.raises(StateError, match="read-only"):
        index.remove_ids(np.array([0]))
    ivfdata = tmp_path / "i4" / IVFDATA_FILE
    ivfdata.write_bytes(ivfdata.read_bytes()[:-8])  # a damaged (or replaced) list file
    with pytest.raises(StateError, match="index.ivfdata' is missing or not the file COMPLETE.json describes"):
        load_index(str(tmp_path / "i4"))
    ivfdata.unlink()
    with pytest.raises(StateError, match="is missing"):
        load_index(str(tmp_path / "i4"))


# ---- embedding ------------------------------------------------------------------------------------------------------
EMOJI = Path.home() / ".cache/metrank/emoji/emoji-datasource-google/package/img/google/64"


@pytest.mark.data
def test_sharded_embedding_equals_in_process_embedding_and_resumes(ray_cluster, tmp_path):
    from metrank.encoders import create_model
    from metrank.errors import InputError
    from metrank.scale.embed import embed
    from metrank.scale.shards import read_shards

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(EMOJI.glob("*.png"))[:12]:
        (images / path.name).write_bytes(path.read_bytes())
    model = create_model("lite0-minilm")
    expected = model.embed_images(sorted(str(p) for p in images.glob("*.png")), progress=False)
    manifest = embed(str(images), str(tmp_path / "emb"), model, num_workers=2, shard_size=5, batch_size=4)
    assert manifest["n_items"] == 12 and manifest["skipped"] == 0 and len(manifest["shards"]) == 3
    ids, vectors, sources = read_shards(str(tmp_path / "emb"))
    np.testing.assert_array_equal(ids, np.arange(12))
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert sources == sorted(str(p) for p in images.glob("*.png"))
    (tmp_path / "emb" / "shard-00001.parquet").unlink()  # an interrupted job: one shard never written
    again = embed(str(images), str(tmp_path / "emb"), model, num_workers=1, shard_size=5, batch_size=4)
    assert again["skipped"] == 2
    np.testing.assert_allclose(read_shards(str(tmp_path / "emb"))[1], expected, atol=1e-6)
    with pytest.raises(InputError, match="GPUs were asked for but the Ray cluster has 0"):
        embed(str(images), str(tmp_path / "gpu"), model, use_gpu=True)


# ---- Ray Train ------------------------------------------------------------------------------------------------------
@pytest.mark.data
@pytest.mark.ddp
def test_ray_train_two_workers_equals_torchrun_with_the_same_seed(ray_cluster, tmp_path, free_port):
    import os
    import subprocess
    import sys

    import torch

    from metrank.encoders import read_checkpoint
    from metrank.scale.train import train
    from metrank.training.checkpoint import load_training_state

    repo = Path(__file__).resolve().parents[1]
    config = repo / "train" / "configs" / "tiny_emoji_image_text.yaml"
    common = [f"output.cache_dir={tmp_path / 'cache'}", "train.batch_size=8", "train.epochs=1", "output.plot=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port), str(repo / "train" / "train_image_text.py"), str(config)]
    proc = subprocess.run(
        [*cmd, f"output.dir={tmp_path / 'torchrun'}", *common], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = train(str(config), [f"output.dir={tmp_path / 'ray'}", *common], num_workers=2)
    assert out == tmp_path / "ray"
    steps = load_training_state(out / "checkpoints" / "last.pt")["global_step"]  # both split the data in two
    assert steps == load_training_state(tmp_path / "torchrun" / "checkpoints" / "last.pt")["global_step"] > 0
    ours = read_checkpoint(tmp_path / "ray" / "model_final.pt")
    theirs = read_checkpoint(tmp_path / "torchrun" / "model_final.pt")
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    with pytest.raises(ValueError, match="GPUs were asked for"):
        train(str(config), [f"output.dir={tmp_path / 'gpu'}", *common], num_workers=2, use_gpu=True)


# ---- command line ---------------------------------------------------------------------------------------------------
def test_scale_commands_build_serve_and_evaluate(ray_cluster, tmp_path, capsys):
    from metrank.cli import main
    from metrank.search import Retriever

    x, labels = clustered(3000, 16, 40, seed=5)
    shards = write_shards(tmp_path / "emb", x, [0, 1500, 3000])
    served = tmp_path / "served"
    assert (
        main(["scale", "index", str(shards), str(tmp_path / "index"), "--serve", str(served), "--memory-gib", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "index 'Flat' for 3,000 x 16" in out and "10-recall@10 1.000" in out  # the sizing choice, printed
    assert len(Retriever.load(str(served), device="cpu")) == 3000
    np.save(tmp_path / "q.npy", x[:500]), np.save(tmp_path / "ql.npy", labels[:500])
    np.save(tmp_path / "g.npy", x[500:]), np.save(tmp_path / "gl.npy", labels[500:])
    argv = ["scale", "evaluate", "--query", str(tmp_path / "q.npy"), "--labels", str(tmp_path / "ql.npy")]
    argv += ["--gallery-shard", str(tmp_path / "g.npy"), str(tmp_path / "gl.npy"), "--ks", "1", "10"]
    assert main(argv) == 0
    expected = retrieval_metrics(x[:500], labels[:500], x[500:], labels[500:], ks=(1, 10))
    assert f"{expected['MAP@R']:.4f}" in capsys.readouterr().out
    ids = np.repeat(np.arange(250), 2)  # images x[:250], two captions each: x[250:750]
    (
        np.save(tmp_path / "img.npy", x[:250]),
        np.save(tmp_path / "txt.npy", x[250:750]),
        np.save(tmp_path / "ids.npy", ids),
    )
    argv = ["scale", "evaluate", "--images", str(tmp_path / "img.npy"), "--texts", str(tmp_path / "txt.npy")]
    assert main([*argv, "--text-image-ids", str(tmp_path / "ids.npy"), "--shards", "2"]) == 0
    expected = image_text_metrics(x[:250], x[250:750], ids)
    assert f"{expected['rsum']:.2f}" in capsys.readouterr().out
    assert main(argv) == 2  # no --text-image-ids: a one-line error
    assert "image-text mode needs" in capsys.readouterr().err
    assert main(["scale", "index", str(tmp_path / "missing"), str(tmp_path / "i2")]) == 2  # a MetrankError: one line
    capsys.readouterr()
    assert main(["scale", "index", str(shards), str(tmp_path / "i3"), "--spec", "IVF16,Flat", "--on-disk"]) == 0
    assert "built 'IVF16,Flat' with 3000 vectors" in capsys.readouterr().out
    assert (tmp_path / "i3" / "index.ivfdata").is_file()
    assert main(["scale", "index", str(shards), str(tmp_path / "i4"), "--spec", "Flat", "--on-disk"]) == 2
    assert "on_disk needs an IVF index" in capsys.readouterr().err
