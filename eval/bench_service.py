"""Reliability and throughput of the search service on a real uvicorn server (a subprocess on 127.0.0.1).

    python eval/bench_service.py crash --trials 20          # kill -9 at random points during add/remove/snapshot
    python eval/bench_service.py search                     # 10,000 searches at concurrency 32 vs in-process FAISS
    python eval/bench_service.py clients --n 100000 --dim 512   # 16 clients: batched vs the unbatched path
    python eval/bench_service.py writes                     # durable vs in-memory add throughput
    python eval/bench_service.py all --trials 3 --searches 500 --n 5000 --dim 64   # quick check of everything

``crash``: writer threads add (explicit vectors) and remove items over HTTP and call ``POST /save`` while the
server snapshots every few writes; the server is killed with SIGKILL at a random moment, the folder reloaded, and
every acknowledged add must be there with its vector, every acknowledged remove gone, the index ids equal to the
store ids. Requests in flight at the kill were never acknowledged: either outcome is allowed for them. Exit
status 1 if anything acknowledged was lost or resurrected.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import psutil
import requests
from tqdm.auto import tqdm

from metrank.metrics import format_table
from metrank.search import Retriever

SERVE = (
    "import sys; from metrank.search import Retriever; from metrank.search.server import serve; "
    "serve(Retriever.load(sys.argv[1]), port=int(sys.argv[2]), max_request_bytes=1 << 26, "
    "snapshot_every_writes=int(sys.argv[3]), batching=sys.argv[4] == '1')"
)


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(directory: str, snapshot_every: int = 1000, batching: bool = True) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(os.path.join(directory, "server.log"), "a")
    args = [sys.executable, "-c", SERVE, directory, str(port), str(snapshot_every), "1" if batching else "0"]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {directory}/server.log")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _percentiles(seconds: list[float], wall: float) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "qps": len(ms) / wall}


# ------------------------------------------------------------------------------------------------ crash trials
def crash_trials(trials: int, dim: int = 16, writers: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    chooser = random.Random(seed)
    directory = tempfile.mkdtemp(prefix="metrank-crash-")
    base = Retriever.create(dim=dim)
    base.add(vectors=_unit(rng, 200, dim), progress=False)
    base.save(directory)
    base.close()
    present: dict[int, np.ndarray] = {}  # id -> vector, as observed after the last restart
    loaded = Retriever.load(directory)
    for i in loaded.store.all_ids().tolist():
        present[i] = loaded.get(i).vector.copy()
    loaded.close()
    totals = {"trials": 0, "acked_adds": 0, "acked_removes": 0, "snapshots_acked": 0}
    killed_in: dict[str, int] = {"add": 0, "remove": 0, "save": 0}  # requests cut off by the kills
    bad = {"lost_adds": 0, "wrong_vectors": 0, "resurrected_removes": 0, "id_mismatch_restarts": 0}
    for trial in tqdm(range(trials), desc="crash trials", unit="trial"):
        proc, url = start_server(directory, snapshot_every=chooser.choice([3, 10, 50]))
        acked_add: dict[int, np.ndarray] = {}
        acked_remove: set[int] = set()
        doubt_remove: set[int] = set()
        lock = threading.Lock()
        stop = threading.Event()

        def writer(w: int) -> None:
            local = np.random.default_rng(seed * 1000 + trial * 10 + w)
            session = requests.Session()
            while not stop.is_set():
                action = local.random()
                kind = "add" if action < 0.6 else "remove" if action < 0.95 else "save"
                try:
                    if action < 0.6:
                        vectors = _unit(local, int(local.integers(1, 20)), dim)
                        r = session.post(f"{url}/items", json={"vectors": vectors.tolist()}, timeout=30)
                        r.raise_for_status()
                        with lock:
                            acked_add.update(zip(r.json()["ids"], vectors))
                    elif action < 0.95:
                        with lock:
                            pool = [i for i in list(present) + list(acked_add) if i not in acked_remove | doubt_remove]
                            ids = [int(i) for i in local.choice(pool, min(len(pool), 5), replace=False)] if pool else []
                            doubt_remove.update(ids)
                        if not ids:
                            continue
                        r = session.post(f"{url}/items/delete", json={"ids": ids}, timeout=30)
                        if r.status_code == 404:  # another writer removed one first: nothing removed
                            with lock:
                                doubt_remove.difference_update(ids)
                            continue
                        r.raise_for_status()
                        with lock:
                            acked_remove.update(ids)
                            doubt_remove.difference_update(ids)
                    else:
                        session.post(f"{url}/save", json={}, timeout=30).raise_for_status()
                        with lock:
                            totals["snapshots_acked"] += 1
                except requests.RequestException:  # the server was killed mid-request: never acknowledged
                    with lock:
                        killed_in[kind] += 1
                    return

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        time.sleep(chooser.uniform(0.2, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
        loaded = Retriever.load(directory)  # replays the store into the snapshot; raises if ids differ
        ids = loaded.store.all_ids()
        if not np.array_equal(np.sort(loaded.index.stored_ids()), ids):
            bad["id_mismatch_restarts"] += 1
        stored = set(ids.tolist())
        for i, vector in acked_add.items():
            if i in acked_remove or i in doubt_remove:
                continue
            if i not in stored:
                bad["lost_adds"] += 1
            elif not np.array_equal(loaded.get(i).vector, vector):
                bad["wrong_vectors"] += 1
        bad["resurrected_removes"] += len(acked_remove & stored)
        totals["trials"] += 1
        totals["acked_adds"] += len(acked_add)
        totals["acked_removes"] += len(acked_remove)
        present = {i: loaded.get(i).vector.copy() for i in stored}
        loaded.close()
    shutil.rmtree(directory, ignore_errors=True)
    return {**totals, **{f"killed_in_{k}": v for k, v in killed_in.items()}, **bad}


def sigterm_check(dim: int = 16) -> dict:
    """SIGTERM shuts down cleanly: the last writes are snapshotted (nothing left to replay) and kept."""
    rng = np.random.default_rng(1)
    directory = tempfile.mkdtemp(prefix="metrank-sigterm-")
    base = Retriever.create(dim=dim)
    base.add(vectors=_unit(rng, 50, dim), progress=False)
    base.save(directory)
    base.close()
    proc, url = start_server(directory)
    ids = requests.post(f"{url}/items", json={"vectors": _unit(rng, 30, dim).tolist()}).json()["ids"]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    loaded = Retriever.load(directory)
    out = {
        "exit_code": code,
        "items": len(loaded),
        "acked_present": bool(set(ids) <= set(loaded.store.all_ids().tolist())),
        "replayed_on_load": loaded.pending_writes,
    }
    loaded.close()
    shutil.rmtree(directory, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ searches
def _gallery(n: int, dim: int) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = _unit(rng, n, dim)
    directory = tempfile.mkdtemp(prefix="metrank-bench-")
    r = Retriever.create(dim=dim, device="cpu")
    for s in range(0, n, 20000):
        r.add(vectors=vectors[s : s + 20000], metadata=[{"c": i % 100} for i in range(s, min(n, s + 20000))])
    r.save(directory)
    r.close()
    return directory, vectors


def _faiss_reference(vectors: np.ndarray, queries: np.ndarray, k: int, batch: int) -> dict:
    """In-process FAISS on the same queries, ``batch`` at a time (1 = one call per query)."""
    raw = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    raw.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    times = []
    start = time.perf_counter()
    for s in range(0, len(queries), batch):
        t = time.perf_counter()
        raw.search(queries[s : s + batch], k)
        times.extend([(time.perf_counter() - t)] * len(queries[s : s + batch]))
    return _percentiles(times, time.perf_counter() - start)


def http_load(url: str, queries: np.ndarray, k: int, clients: int) -> dict:
    errors = 0
    sessions = threading.local()

    def one(q: np.ndarray) -> float:
        nonlocal errors
        session = getattr(sessions, "s", None) or requests.Session()
        sessions.s = session
        t = time.perf_counter()
        r = session.post(f"{url}/search", json={"vector": q.tolist(), "k": k}, timeout=120)
        if r.status_code != 200 or len(r.json()["hits"]) != k:
            errors += 1
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = list(pool.map(one, queries))
    return {**_percentiles(times, time.perf_counter() - start), "errors": errors, "_times": times}


def search_bench(searches: int, clients: int, n: int, dim: int, k: int = 10) -> list[dict]:
    directory, vectors = _gallery(n, dim)
    queries = _unit(np.random.default_rng(1), searches, dim)
    proc, url = start_server(directory)
    server = psutil.Process(proc.pid)
    rss_before = server.memory_info().rss
    http_load(url, queries[: min(200, searches)], k, clients)  # warm-up
    ours = http_load(url, queries, k, clients)
    ours.pop("_times")
    rss_after = server.memory_info().rss
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    faiss_rows = _faiss_reference(vectors, queries, k, batch=clients)
    shutil.rmtree(directory, ignore_errors=True)
    return [
        {"setting": f"FAISS in-process, batches of {clients}", **faiss_rows, "errors": 0},
        {
            "setting": f"HTTP, {clients} concurrent clients",
            **ours,
            "qps_vs_faiss": ours["qps"] / faiss_rows["qps"],
            "rss_before_MiB": rss_before / 2**20,
            "rss_after_MiB": rss_after / 2**20,
        },
    ]


def clients_bench(n: int, dim: int, queries_n: int, k: int = 10, rounds: int = 4) -> list[dict]:
    """The unbatched and the batched server side by side, measured in alternating rounds (so that other load on the
    machine hits both alike)."""
    directory, vectors = _gallery(n, dim)
    queries = _unit(np.random.default_rng(2), queries_n, dim)
    servers = {name: start_server(directory, batching=name == "batched") for name in ("unbatched", "batched")}
    for _, url in servers.values():
        http_load(url, queries[:32], k, 4)  # warm-up
    rows = []
    for clients in (1, 16):
        times: dict[str, list] = {name: [] for name in servers}
        walls = dict.fromkeys(servers, 0.0)
        errors = dict.fromkeys(servers, 0)
        for chunk in np.array_split(queries, rounds):
            for name, (_, url) in servers.items():
                result = http_load(url, chunk, k, clients)
                walls[name] += len(chunk) / result["qps"]
                errors[name] += result["errors"]
                times[name].extend(result.pop("_times"))
        for name in servers:
            rows.append(
                {
                    "setting": f"{name}, {clients} clients",
                    **_percentiles(times[name], walls[name]),
                    "errors": errors[name],
                }
            )
    for proc, _ in servers.values():
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    raw = _faiss_reference(vectors, queries, k, batch=len(queries))
    rows.append({"setting": f"FAISS in-process (default kernel), one batch of {len(queries)}", **raw, "errors": 0})
    unbatched16, batched16 = rows[2]["qps"], rows[3]["qps"]
    for row in rows:
        row["qps_vs_unbatched16"] = row["qps"] / unbatched16
    print(
        f"16 clients: batched {batched16:.0f} q/s vs unbatched {unbatched16:.0f} q/s ({batched16 / unbatched16:.2f}x)"
    )
    shutil.rmtree(directory, ignore_errors=True)
    return rows


def writes_bench(dim: int, adds: int, batch: int) -> list[dict]:
    rng = np.random.default_rng(3)
    vectors = _unit(rng, adds * batch, dim)
    rows = []
    for mode in ("in-memory", "durable (autocommit)", "durable, autocommit=False"):
        r = Retriever.create(dim=dim, device="cpu")
        directory = None
        if mode != "in-memory":
            directory = tempfile.mkdtemp(prefix="metrank-writes-")
            r.save(directory)
            r.close()
            r = Retriever.load(directory, autocommit=mode == "durable (autocommit)")
        start = time.perf_counter()
        for s in range(0, len(vectors), batch):
            r.add(vectors=vectors[s : s + batch], metadata=[{"c": 1}] * batch, progress=False)
        r.commit()
        seconds = time.perf_counter() - start
        rows.append(
            {"writes": mode, "batch": batch, "adds_per_s": adds / seconds, "items_per_s": len(vectors) / seconds}
        )
        if directory:
            r.close()
            shutil.rmtree(directory, ignore_errors=True)
    for row in rows:
        row["vs_in_memory"] = row["adds_per_s"] / rows[0]["adds_per_s"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["crash", "search", "clients", "writes", "all"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--searches", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--n", type=int, default=100_000, help="gallery size for clients (search uses min(n, 20k))")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--client-queries", type=int, default=800)
    parser.add_argument("--adds", type=int, default=300)
    args = parser.parse_args(argv)
    failed = False
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.what in ("crash", "all"):
        result = crash_trials(args.trials)
        print(format_table([result]))
        print(format_table([sigterm_check()]))
        failed = any(
            result[key] for key in ("lost_adds", "wrong_vectors", "resurrected_removes", "id_mismatch_restarts")
        )
    if args.what in ("search", "all"):
        print(format_table(search_bench(args.searches, args.concurrency, min(args.n, 20_000), min(args.dim, 256))))
    if args.what in ("clients", "all"):
        print(format_table(clients_bench(args.n, args.dim, args.client_queries)))
    if args.what in ("writes", "all"):
        rows = writes_bench(min(args.dim, 256), args.adds, 1) + writes_bench(min(args.dim, 256), args.adds // 10, 100)
        print(format_table(rows))
    print("FAILED: acknowledged writes lost" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
