"""Search service benchmark: ingest rate, search latency (p50/p99) and throughput of ``Retriever`` in-process and
over HTTP (uvicorn in a subprocess on loopback, concurrent clients), against the same queries on the raw FAISS index
in-process (overhead ratio = our time / raw FAISS time).

    python eval/bench_search.py                          # 100k x 512 (the brief's size)
    python eval/bench_search.py --n 5000 --dim 64 --queries 100 --clients 1,4   # quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import requests

from metrank.metrics import format_table
from metrank.search import Retriever


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _latency_row(name: str, seconds: list[float], wall: float, baseline: dict[str, float] = None) -> dict:
    ms = np.asarray(seconds) * 1000
    row = {
        "setting": name,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "qps": len(seconds) / wall,
    }
    if baseline:
        row["p50_vs_faiss"] = row["p50_ms"] / baseline["p50_ms"]
        row["qps_vs_faiss"] = row["qps"] / baseline["qps"]
    return row


def _timed_loop(fn: Callable[[int], None], n: int) -> tuple:
    times = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times, time.perf_counter() - start


def _start_server(directory: str) -> tuple:
    code = (
        "import sys; from metrank.search import Retriever; from metrank.search.server import serve; "
        "serve(Retriever.load(sys.argv[1]), port=int(sys.argv[2]), max_request_bytes=1 << 24)"
    )
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(os.path.join(directory, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", code, directory, str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="gallery size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--clients", default="1,4,16", help="concurrent HTTP clients to try")
    parser.add_argument("--batch", type=int, default=10_000, help="ingest batch size")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    vectors = _unit(rng, args.n, args.dim)
    metadata = [{"category": i % 100, "source": "synthetic", "title": f"item {i}"} for i in range(args.n)]
    queries = _unit(rng, args.queries, args.dim)
    print(
        f"gallery {args.n} x {args.dim}, {args.queries} queries, k={args.k}, faiss threads {faiss.omp_get_max_threads()}"
    )

    # ---- ingest
    raw = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
    t = time.perf_counter()
    for s in range(0, args.n, args.batch):
        raw.add_with_ids(vectors[s : s + args.batch], np.arange(s, min(s + args.batch, args.n), dtype=np.int64))
    raw_ingest = time.perf_counter() - t
    retriever = Retriever.create(dim=args.dim, device="cpu")
    t = time.perf_counter()
    for s in range(0, args.n, args.batch):
        retriever.add(vectors=vectors[s : s + args.batch], metadata=metadata[s : s + args.batch], progress=False)
    ours_ingest = time.perf_counter() - t
    directory = tempfile.mkdtemp(prefix="metrank-bench-")
    t = time.perf_counter()
    retriever.save(directory)
    save_time = time.perf_counter() - t
    t = time.perf_counter()
    Retriever.load(directory)
    load_time = time.perf_counter() - t
    print(
        format_table(
            [
                {"ingest": "raw FAISS add", "items_per_s": args.n / raw_ingest, "seconds": raw_ingest},
                {
                    "ingest": "Retriever.add (vectors + metadata)",
                    "items_per_s": args.n / ours_ingest,
                    "seconds": ours_ingest,
                    "vs_faiss": raw_ingest / ours_ingest,
                },
                {"ingest": "Retriever.save (snapshot)", "items_per_s": args.n / save_time, "seconds": save_time},
                {"ingest": "Retriever.load (verify + read)", "items_per_s": args.n / load_time, "seconds": load_time},
            ]
        )
    )

    # ---- in-process search, one query at a time
    rows = []
    times, wall = _timed_loop(lambda i: raw.search(queries[i : i + 1], args.k), args.queries)
    base = _latency_row("raw FAISS search (in-process)", times, wall)
    rows.append(base)
    times, wall = _timed_loop(lambda i: retriever.search_vectors(queries[i : i + 1], args.k), args.queries)
    rows.append(_latency_row("Retriever.search (in-process)", times, wall, base))
    times, wall = _timed_loop(
        lambda i: retriever.search_vectors(queries[i : i + 1], args.k, filter={"category": i % 100}), args.queries
    )
    rows.append(_latency_row("Retriever.search, 1% filter", times, wall, base))
    times, wall = _timed_loop(
        lambda i: retriever.search_vectors(
            queries[i : i + 1], args.k, filter={"category": list(range(i % 90, i % 90 + 10))}
        ),
        args.queries,
    )
    rows.append(_latency_row("Retriever.search, 10% filter", times, wall, base))
    t = time.perf_counter()
    raw.search(queries, args.k)
    batched = time.perf_counter() - t
    rows.append(
        {
            "setting": "raw FAISS, all queries in one batch",
            "qps": args.queries / batched,
            "qps_vs_faiss": args.queries / batched / base["qps"],
        }
    )

    print(format_table(rows))
    rows = [base]

    # ---- HTTP: uvicorn in a subprocess, concurrent clients on loopback
    proc, url = _start_server(directory)
    try:
        bodies = [{"vector": q.tolist(), "k": args.k} for q in queries]
        for clients in [int(c) for c in args.clients.split(",")]:
            sessions = [requests.Session() for _ in range(clients)]

            def one(i: int) -> float:
                t0 = time.perf_counter()
                response = sessions[i % clients].post(f"{url}/search", json=bodies[i])
                response.raise_for_status()
                return time.perf_counter() - t0

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(min(clients * 2, args.queries))))  # warm-up: connections
                t = time.perf_counter()
                times = list(pool.map(one, range(args.queries)))
                wall = time.perf_counter() - t
            rows.append(_latency_row(f"HTTP POST /search, {clients} client(s)", times, wall, base))
    except requests.ConnectionError:
        print(
            f"server exit code {proc.poll()}; its log:\n" + open(os.path.join(directory, "server.log")).read()[-3000:]
        )
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
