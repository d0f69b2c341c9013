"""Benchmark metrank.scale on a local Ray cluster against the plain in-process code, in one run.

    python eval/bench_scale.py                                   # 96 emoji images, 1M x 512 IVF4096 (~10 GiB RAM)
    python eval/bench_scale.py --images 32 --n 100000 --nlist 1024   # quick check
    python eval/bench_scale.py --images 0 --work /big/disk       # index part only, scratch files elsewhere

1. Embedding throughput (images/s): ``model.embed_images`` in this process vs ``metrank.scale.embed.embed`` with 1
   and 2 Ray Data actors (same model, same images); the ratio shows Ray's overhead (1 actor) and scaling (2).
2. Index build: ``IVF{nlist},Flat`` over N x d vectors in Parquet shards, one quantiser trained once and used by
   all three: one process (add + write) vs ``metrank.scale.index.build_index(trained=...)`` with ``--cpus`` Ray
   workers, merged in RAM and on disk (``on_disk=True``: ``index.ivfdata``). Columns: seconds (add tasks and merge
   from the build's ``COMPLETE.json``), the peak anonymous memory above the start level summed over this process
   and its Ray processes (mapped index pages are page cache, not counted), and whether searches (1000 queries,
   nprobe 16, k 10) give the one-process ids and scores exactly.
3. The commands a user runs on a real multi-GPU Ray cluster.

On this 2-core machine, 2 workers cannot beat one process by much (and the machine is shared: compare the ratios of
one run); the point of the Ray path is that the same code spreads over many GPU nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import ray
from tqdm import tqdm

from metrank.encoders import create_model
from metrank.index import Index, create_index
from metrank.metrics import format_table
from metrank.scale.embed import embed
from metrank.scale.index import MARKER, build_index
from metrank.scale.shards import write_shard

EMOJI = Path.home() / ".cache/metrank/emoji/emoji-datasource-google/package/img/google/64"

CLUSTER_COMMANDS = """\
# on every node of the cluster (GPU nodes: one Ray GPU per device); the head node first
ray start --head --port=6379                      # head
ray start --address=HEAD_IP:6379 --num-gpus=8     # each GPU worker node
export RAY_ADDRESS=HEAD_IP:6379                   # where metrank finds the cluster
# 1. embed a catalogue on 16 GPU actors into resumable Parquet shards (rerun after a failure: finished shards stay)
metrank embed --model CHECKPOINT.pt --images /shared/catalogue --out /shared/emb --ray 16 --gpus --shard-size 100000
# 2. sharded IVF/IVF-PQ build (index sized for N and 64 GiB, printed), saved as a retriever for metrank serve;
#    an index larger than RAM: --spec IVF65536,PQ64 --on-disk (lists merged into /shared/index/index.ivfdata, mapped)
metrank scale index /shared/emb /shared/index --spec auto --memory-gib 64 --serve /shared/served --model CHECKPOINT.pt
metrank serve /shared/served
# 3. exact sharded evaluation: gallery shards held by actors, queries broadcast, rank counts summed
metrank scale evaluate --query q.npy --labels q_labels.npy --gallery-shard g0.npy l0.npy --gallery-shard g1.npy l1.npy
# 4. DDP training on 16 GPU workers (NCCL), metrank's own samplers
metrank train train/configs/CONFIG.yaml output.dir=/shared/runs/r1 --ray 16 --gpus"""


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_embedding(args, work: Path) -> None:
    images = work / "images"
    images.mkdir()
    for path in sorted(EMOJI.glob("*.png"))[: args.images]:
        shutil.copy(path, images / path.name)
    paths = sorted(str(p) for p in images.glob("*.png"))
    model = create_model("lite0-minilm")
    model.embed_images(paths[:4], progress=False)  # warm-up
    _, t_local = timed(lambda: model.embed_images(paths, batch_size=args.batch_size, progress=False))
    rows, names = [{"images_per_s": len(paths) / t_local, "vs_in_process": 1.0}], ["in-process embed_images"]
    for workers in (1, 2):
        out = work / f"emb{workers}"
        _, seconds = timed(
            lambda: embed(
                str(images),
                str(out),
                model,
                num_workers=workers,
                shard_size=-(-len(paths) // 4),
                batch_size=args.batch_size,
            )  # fmt: skip
        )
        rows.append({"images_per_s": len(paths) / seconds, "vs_in_process": t_local / seconds})
        names.append(f"Ray Data, {workers} actor{'s' * (workers > 1)} (incl. actor start-up)")
    print(f"\nembedding {len(paths)} emoji images with lite0-minilm (batch {args.batch_size}):")
    print(format_table(rows, names))


class PeakMemory:
    """Peak anonymous memory (RssAnon: what must fit in RAM; mapped file pages are page cache) summed over this
    process and its descendants (a local Ray cluster's raylet and workers), sampled every 0.1 s; ``extra_gib`` is
    the peak above the level when the block started."""

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.baseline) / 2**30

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.sample())

    @staticmethod
    def sample() -> int:
        children: dict[int, list[int]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
            except OSError:
                continue
        return total


def warm_up(folder: Path) -> None:
    """A tiny build of each kind, so worker start-up is not counted in the timed builds (the on-disk merge task still
    starts its own worker, as it does in every build)."""
    x = np.random.default_rng(1).standard_normal((2000, 8)).astype(np.float32)
    folder.mkdir()
    for k in range(2):
        write_shard(str(folder / f"shard-{k:05d}.parquet"), np.arange(k, 2000, 2), x[k::2], [""] * 1000)
    for on_disk in (False, True):
        build_index(str(folder), str(folder / f"index-{on_disk}"), spec="IVF16,Flat", on_disk=on_disk)


def bench_index(args, work: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4 * args.nlist, args.d)).astype(np.float32)
    x = np.empty((args.n, args.d), np.float32)
    for start in tqdm(range(0, args.n, 65536), desc="vectors", leave=False):
        stop = min(start + 65536, args.n)
        part = centres[rng.integers(0, len(centres), stop - start)]
        part += 0.5 * rng.standard_normal(part.shape, dtype=np.float32)
        x[start:stop] = part / np.linalg.norm(part, axis=1, keepdims=True)
    shards = work / "shards"
    shards.mkdir()
    bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_shard(str(shards / f"shard-{k:05d}.parquet"), np.arange(lo, hi), x[lo:hi], [""] * (hi - lo))
    spec = f"IVF{args.nlist},Flat"
    train_size = min(args.n, args.train_per_list * args.nlist)
    sample = x[np.sort(rng.choice(args.n, train_size, replace=False))]
    trained, t_train = timed(create_index(spec, args.d, device="cpu").train, sample, max_train=None)
    queries = x[rng.choice(args.n, 1000, replace=False)]

    def searched(index):
        index.nprobe = 16
        return index.search(queries, 10)

    single = Index(faiss.clone_index(trained._cpu), spec=spec, device="cpu")  # the same trained quantiser
    with PeakMemory() as memory:
        _, t_add = timed(single.add, x, np.arange(args.n))
        _, t_write = timed(single.save, str(work / "single.faiss"))
    expected = searched(single)
    t_single = t_add + t_write
    rows = [{"total_s": t_single, "add_s": t_add, "write_s": t_write, "extra_anon_gib": memory.extra_gib}]
    names = ["one process: add + write"]
    del single, x, sample
    warm_up(work / "warm-up")  # Ray workers started and metrank imported in them: not timed below
    for on_disk in (False, True):
        out = work / f"index-{'disk' if on_disk else 'ram'}"
        with PeakMemory() as memory:
            index, seconds = timed(build_index, str(shards), str(out), trained=trained, on_disk=on_disk)
        phases = json.loads((out / MARKER).read_text())["seconds"]
        scores, ids = searched(index)
        identical = bool(np.array_equal(ids, expected[1]) and np.array_equal(scores, expected[0]))
        rows.append(
            {
                "total_s": seconds,
                "add_s": phases["add"],
                "merge_s": phases["merge"],
                "vs_one_process": t_single / seconds,
                "extra_anon_gib": memory.extra_gib,
                "same_results": identical,
            }
        )
        names.append(f"Ray, {args.cpus} workers: add tasks + {'on-disk' if on_disk else 'in-RAM'} merge + write")
        del index
    print(
        f"\nindex {spec} over {args.n} x {args.d} in {args.shards} Parquet shards, one quantiser trained once "
        f"({train_size} vectors, {t_train:.1f} s); search check: 1000 queries, nprobe 16, k 10:"
    )
    print(format_table(rows, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="emoji images embedded (0: skip the embedding part)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index build (0: skip it)")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--train-per-list", type=int, default=40, help="training vectors per IVF list")
    parser.add_argument("--shards", type=int, default=4, help="Parquet shards (one Ray add task each)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (= parallel tasks)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one; needs ~3 x n x d x 4 bytes)")
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if args.images:
            bench_embedding(args, Path(tmp))
        if args.n:
            bench_index(args, Path(tmp))
    print("\ncommands on a real multi-GPU Ray cluster:\n" + CLUSTER_COMMANDS)


if __name__ == "__main__":
    main()
