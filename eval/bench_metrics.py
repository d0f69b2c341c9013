"""Benchmark: exact R@1/10/100 + MAP@R by rank counting vs raw FAISS search and pytorch-metric-learning, in one run.

    python eval/bench_metrics.py                      # N=100k, d=512, 5 items per class (takes minutes)
    python eval/bench_metrics.py --n 20000            # quick check
    python eval/bench_metrics.py --memory-n 1000000 --queries 2000   # 1M x 512 gallery: peak memory (RSS)

Prints each time, the ratios, and the achieved fraction of the GEMM-bound work 2*Q*N*d at the GEMM rate measured
in the same run (above 1 is possible: leave-one-out scores each tile of the symmetric x x^T once; the general path,
what a separate query set takes, is timed too and must give the same numbers); the reference is a raw
``faiss.IndexFlatIP.search(k=101)`` of the same queries (top 100 after dropping the query itself: what R@100
needs), timed before and after metrank. Checks P@1 and MAP@R against PML's
AccuracyCalculator (max abs difference). ``--threads`` sets torch's and FAISS's thread counts (default: all cores;
on a shared machine the numbers are noisy -- compare the ratios of one run, not absolute times).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import faiss
import numpy as np
import torch

from metrank.metrics import format_table, retrieval_metrics


def clustered_embeddings(n: int, d: int, per_class: int, seed: int = 0):
    """Unit vectors around one random centre per class (``per_class`` items each), float32, built in chunks."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) // per_class).astype(np.int64)
    centres = rng.standard_normal((labels.max() + 1, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        part = centres[labels[start : start + 65536]] + 2.5 * rng.standard_normal(
            (len(labels[start : start + 65536]), d), dtype=np.float32
        )
        x[start : start + 65536] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels


def gemm_rate(d: int, repeats: int = 3) -> float:
    """Best float32 GEMM rate (flop/s) of torch and numpy on a [4096, d] x [d, 16384] product into a preallocated
    output (no page faults: the peak a GEMM-bound computation can reach)."""
    a = np.random.default_rng(1).standard_normal((4096, d), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((d, 16384), dtype=np.float32)
    out = np.empty((4096, 16384), np.float32)
    best = np.inf
    for multiply in (
        lambda: torch.matmul(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out)),
        lambda: np.matmul(a, b, out=out),
    ):
        multiply()
        for _ in range(repeats):
            start = time.perf_counter()
            multiply()
            best = min(best, time.perf_counter() - start)
    return 2 * 4096 * d * 16384 / best


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_speed(args) -> None:
    x, labels = clustered_embeddings(args.n, args.d, args.per_class)
    rate = gemm_rate(args.d)
    work = 2.0 * args.n * args.n * args.d
    print(
        f"N={args.n} d={args.d} classes={labels.max() + 1}; GEMM rate {rate / 1e9:.1f} GFLOP/s; "
        f"2*N^2*d = {work / 1e12:.2f} TFLOP -> {work / rate:.1f} s at that rate"
    )

    def raw_faiss():
        index = faiss.IndexFlatIP(args.d)
        index.add(x)
        return index.search(x, 101)

    _, t_faiss = timed(raw_faiss)
    ours, t_ours = timed(lambda: retrieval_metrics(x, labels, ks=(1, 10, 100), progress=False))
    # the general path (what a separate query set takes): query chunks against the whole gallery, no symmetry
    general, t_general = timed(
        lambda: retrieval_metrics(x, labels, ks=(1, 10, 100), chunk_size=1 << 16, progress=False)
    )
    _, t_faiss_again = timed(raw_faiss)  # FAISS on both sides of ours: load drift on a shared machine shows up
    rate = max(rate, gemm_rate(args.d))  # GEMM before and after too: the better rate is the bound
    print(f"raw FAISS before/after: {t_faiss:.1f} s / {t_faiss_again:.1f} s (the faster one is the reference)")
    if general != ours:
        raise SystemExit(f"the general path disagrees with the leave-one-out pass: {general} vs {ours}")
    t_faiss = min(t_faiss, t_faiss_again)
    names = [
        "faiss IndexFlatIP k=101",
        "metrank R@1,10,100+MAP@R (leave-one-out: x x^T tiles once)",
        "metrank, general path (query chunks x gallery)",
    ]
    rows = [
        {"time_s": t, "vs_faiss": t / t_faiss, "gemm_fraction": work / rate / t} for t in (t_faiss, t_ours, t_general)
    ]
    if not args.skip_pml:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
        pml, t_pml = timed(lambda: calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels)))
        rows.append({"time_s": t_pml, "vs_faiss": t_pml / t_faiss, "gemm_fraction": work / rate / t_pml})
        names.append("PML AccuracyCalculator")
        print(format_table(rows, names))
        print(f"metrank / PML time: {t_ours / t_pml:.3f}")
        print(
            f"max |metrank - PML|: P@1 {abs(ours['P@1'] - pml['precision_at_1']):.2e}, "
            f"MAP@R {abs(ours['MAP@R'] - pml['mean_average_precision_at_r']):.2e} "
            "(PML ranks by L2 distance; on unit vectors only rounding-level near-ties can differ)"
        )
    else:
        print(format_table(rows, names))
    print(format_table(ours))


def bench_memory(args) -> None:
    x, labels = clustered_embeddings(args.memory_n + args.queries, args.d, args.per_class)  # labels are shuffled
    gallery, gallery_labels = x[: args.memory_n], labels[: args.memory_n]  # views: no copy
    query, query_labels = x[args.memory_n :], labels[args.memory_n :]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ours, seconds = timed(lambda: retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 10, 100)))
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rate = gemm_rate(args.d)
    work = 2.0 * args.queries * args.memory_n * args.d
    print(
        f"gallery {args.memory_n} x {args.d} ({gallery.nbytes / 2**20:.0f} MiB), {args.queries} queries: "
        f"{seconds:.1f} s, {work / rate / seconds:.0%} of the {rate / 1e9:.0f} GFLOP/s GEMM bound"
    )
    print(f"peak RSS {rss_peak:.2f} GiB (after building the data: {rss_before:.2f} GiB)")
    print(format_table(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="embeddings (queries = gallery, leave-one-out)")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--skip-pml", action="store_true")
    parser.add_argument("--memory-n", type=int, default=0, help="gallery size for the memory run (e.g. 1000000)")
    parser.add_argument("--queries", type=int, default=2000, help="queries in the memory run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, {faiss.omp_get_max_threads()} threads")
    bench_memory(args) if args.memory_n else bench_speed(args)


if __name__ == "__main__":
    main()
