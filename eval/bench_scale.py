"""Benchmark metrank.scale on a local Ray cluster against the plain in-process code, in one run.

    python eval/bench_scale.py                          # 96 emoji images, 200k x 512 IVF1024 (a few minutes)
    python eval/bench_scale.py --images 32 --n 50000    # quick check

1. Embedding throughput (images/s): ``model.embed_images`` in this process vs ``metrank.scale.embed.embed`` with 1
   and 2 Ray Data actors (same model, same images); the ratio shows Ray's overhead (1 actor) and scaling (2).
2. Index build: ``IVF{nlist},Flat`` over N x d vectors in 4 Parquet shards -- one process (train + add) vs
   ``metrank.scale.index.build_index`` (the same training, shards added in parallel Ray tasks, merged).
3. The commands a user runs on a real multi-GPU Ray cluster.

On this 2-core machine, 2 workers cannot beat one process by much (and the machine is shared: compare the ratios of
one run); the point of the Ray path is that the same code spreads over many GPU nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from metrank.encoders import create_model
from metrank.index import create_index
from metrank.metrics import format_table
from metrank.scale.embed import embed
from metrank.scale.index import build_index
from metrank.scale.shards import write_shard

EMOJI = Path.home() / ".cache/metrank/emoji/emoji-datasource-google/package/img/google/64"

CLUSTER_COMMANDS = """\
# on every node of the cluster (GPU nodes: one Ray GPU per device); the head node first
ray start --head --port=6379                      # head
ray start --address=HEAD_IP:6379 --num-gpus=8     # each GPU worker node
export RAY_ADDRESS=HEAD_IP:6379                   # where metrank finds the cluster
# 1. embed a catalogue on 16 GPU actors into resumable Parquet shards (rerun after a failure: finished shards stay)
metrank embed --model CHECKPOINT.pt --images /shared/catalogue --out /shared/emb --ray 16 --gpus --shard-size 100000
# 2. sharded IVF/IVF-PQ build (index sized for N and 64 GiB, printed), saved as a retriever for metrank serve
metrank scale index /shared/emb /shared/index --spec auto --memory-gib 64 --serve /shared/served --model CHECKPOINT.pt
metrank serve /shared/served
# 3. exact sharded evaluation: gallery shards held by actors, queries broadcast, rank counts summed
metrank scale evaluate --query q.npy --labels q_labels.npy --gallery-shard g0.npy l0.npy --gallery-shard g1.npy l1.npy
# 4. DDP training on 16 GPU workers (NCCL), metrank's own samplers
metrank train train/configs/CONFIG.yaml output.dir=/shared/runs/r1 --ray 16 --gpus"""


def timed(fn):
    start = time.perf_counter()
    out = fn()
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


def bench_index(args, work: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4 * args.nlist, args.d)).astype(np.float32)
    x = np.empty((args.n, args.d), np.float32)
    for start in range(0, args.n, 65536):
        stop = min(start + 65536, args.n)
        part = centres[rng.integers(0, len(centres), stop - start)]
        part += 0.5 * rng.standard_normal(part.shape, dtype=np.float32)
        x[start:stop] = part / np.linalg.norm(part, axis=1, keepdims=True)
    shards = work / "shards"
    shards.mkdir()
    bounds = np.linspace(0, args.n, 5).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_shard(str(shards / f"shard-{k:05d}.parquet"), np.arange(lo, hi), x[lo:hi], [""] * (hi - lo))
    spec = f"IVF{args.nlist},Flat"
    train_size = min(args.n, 64 * args.nlist)

    def one_process():
        index = create_index(spec, args.d, device="cpu")
        share = -(-train_size // 4)  # the same sample build_index takes: an even share of each shard
        sample_rng = np.random.default_rng(0)
        parts = [x[lo:hi][np.sort(sample_rng.choice(hi - lo, min(share, hi - lo), replace=False))]
                 for lo, hi in zip(bounds[:-1], bounds[1:])]  # fmt: skip
        _, t_train = timed(lambda: index.train(np.concatenate(parts), max_train=None))
        _, t_add = timed(lambda: index.add(x, np.arange(args.n)))
        return t_train, t_add

    (t_train, t_add), t_single = timed(one_process)
    _, t_sharded = timed(lambda: build_index(str(shards), str(work / "index"), spec=spec, train_size=train_size))
    print(f"\nindex {spec} over {args.n} x {args.d} in 4 shards (training sample {train_size}):")
    print(
        format_table(
            [
                {"time_s": t_single, "train_s": t_train, "add_s": t_add, "vs_one_process": 1.0},
                {"time_s": t_sharded, "vs_one_process": t_single / t_sharded},
            ],
            ["one process (train + add)", "metrank.scale build_index (train + Ray add tasks + merge + save)"],
        )  # fmt: skip
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=200_000, help="vectors in the index build")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        bench_embedding(args, Path(tmp))
        bench_index(args, Path(tmp))
    print("\ncommands on a real multi-GPU Ray cluster:\n" + CLUSTER_COMMANDS)


if __name__ == "__main__":
    main()
