"""Durable acknowledged writes on a real uvicorn server subprocess: kill -9 trials (the full 20+ run is
``python eval/bench_service.py crash``), SIGTERM shutdown, replay of writes made after the last snapshot."""

import os
import subprocess
import sys

import numpy as np
import pytest

from metrank.search import Retriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "eval", "bench_service.py")


@pytest.mark.slow
def test_kill9_trials_and_sigterm_lose_nothing_acknowledged():
    result = subprocess.run(
        [sys.executable, BENCH, "crash", "--trials", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trials"))
    counts = dict(zip(lines[header].split(), map(int, lines[header + 2].split())))
    assert counts["trials"] == 3 and counts["acked_adds"] > 0 and counts["acked_removes"] > 0
    assert counts["lost_adds"] == counts["resurrected_removes"] == counts["wrong_vectors"] == 0
    assert counts["id_mismatch_restarts"] == 0
    term = next(i for i, line in enumerate(lines) if line.startswith("exit_code"))
    exit_code, items, acked, replayed = lines[term + 2].split()
    assert exit_code in ("0", "-15") and items == "80" and acked == "True" and replayed == "0"


def test_writes_after_the_snapshot_are_replayed(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    r = Retriever.create(dim=8)
    r.add(vectors=vectors[:20], metadata=[{"c": i % 2} for i in range(20)], progress=False)
    r.save(str(tmp_path))
    r.add(vectors=vectors[20:50], metadata=[{"c": 1}] * 30, progress=False)  # committed, not snapshotted
    r.remove([3, 25])
    r.remove([40])
    r.add(vectors=vectors[50:51], ids=[40], progress=False)  # a removed id re-added with another vector
    r.store.close()  # as if the process died: no save
    loaded = Retriever.load(str(tmp_path))
    assert loaded.pending_writes > 0
    expected = sorted(set(range(50)) - {3, 25})
    assert loaded.store.all_ids().tolist() == expected
    assert np.array_equal(loaded.get(40).vector, vectors[50])
    hits = loaded.search(vector=vectors[50], k=1)
    assert hits[0].id == 40 and abs(hits[0].score - float(vectors[50] @ vectors[50])) < 1e-3
    matching = [i for i in expected if i != 40 and (i >= 20 or i % 2 == 1)]  # id 40 came back without metadata
    reference = sorted(matching, key=lambda i: (-float(vectors[i].astype(np.float64) @ vectors[7]), i))
    assert [h.id for h in loaded.search(vector=vectors[7], k=50, filter={"c": 1})] == reference


def test_autocommit_false_keeps_writes_until_commit(tmp_path):
    vectors = np.eye(8, dtype=np.float32)
    r = Retriever.create(dim=8)
    r.add(vectors=vectors[:2], progress=False)
    r.save(str(tmp_path))
    r.close()
    bulk = Retriever.load(str(tmp_path), autocommit=False)
    bulk.add(vectors=vectors[2:4], progress=False)
    bulk.commit()
    bulk.add(vectors=vectors[4:], progress=False)  # never committed
    bulk.store._db.close()  # the process dies: the open transaction is rolled back
    assert Retriever.load(str(tmp_path)).store.all_ids().tolist() == [0, 1, 2, 3]


def test_rows_the_snapshot_lacks_are_recovered(tmp_path):
    """A second writer on the same folder (unsupported) numbers its writes like the first; its rows still load."""
    vectors = np.eye(8, dtype=np.float32)
    r = Retriever.create(dim=8)
    r.add(vectors=vectors[:2], progress=False)
    r.save(str(tmp_path))
    r.close()
    first, second = Retriever.load(str(tmp_path)), Retriever.load(str(tmp_path))
    first.add(vectors=vectors[2:4], progress=False)
    second.add(vectors=vectors[4:6], ids=[10, 11], progress=False)
    first.save()  # its snapshot claims every write up to its own count, without the second's rows
    first.close()
    second.close()
    loaded = Retriever.load(str(tmp_path))
    assert loaded.store.all_ids().tolist() == [0, 1, 2, 3, 10, 11]
    assert loaded.search(vector=vectors[5], k=1)[0].id == 11
