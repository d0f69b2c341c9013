"""``metrank scale index | evaluate``: the Ray-backed sharded index build and sharded exact evaluation.

    metrank scale index /shared/emb /shared/index --spec auto --memory-gib 64 [--on-disk] [--serve DIR --model M]
    metrank scale evaluate --query q.npy --labels ql.npy --gallery-shard g1.npy l1.npy --gallery-shard g2.npy l2.npy
    metrank scale evaluate --images img.npy --texts txt.npy --text-image-ids ids.npy --shards 8

The cluster is the one ``RAY_ADDRESS`` names (else a local one). ``--spec auto`` picks the index for the shards' N
and dimension within ``--memory-gib`` (``metrank.index.choose_index``, printed).
"""

from __future__ import annotations

import argparse

from metrank.embeddings_io import load_embeddings, load_labels
from metrank.errors import InputError
from metrank.index import choose_index
from metrank.metrics import format_table
from metrank.scale.evaluate import image_text_metrics, retrieval_metrics
from metrank.scale.index import build_index, to_retriever
from metrank.scale.shards import read_shard, read_shard_ids, shard_files


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scale", help="sharded index build and exact evaluation on a Ray cluster")
    commands = parser.add_subparsers(dest="scale_command", required=True)
    index = commands.add_parser("index", help="build one IVF/IVF-PQ index from embedding shards in Ray tasks")
    index.add_argument("shards", help="folder of shard-*.parquet (from metrank embed --ray)")
    index.add_argument("out", help="output folder (index.faiss [+ index.ivfdata] + COMPLETE.json)")
    index.add_argument("--spec", default="auto", help="FAISS factory string, or auto (sized by --memory-gib)")
    index.add_argument("--memory-gib", type=float, default=16.0, help="memory budget for --spec auto")
    index.add_argument("--train-size", type=int, default=100_000, help="vectors sampled to train the quantiser")
    index.add_argument(
        "--on-disk", action="store_true",
        help="IVF only: merge the shards' inverted lists into OUT/index.ivfdata (memory-mapped) instead of in RAM",
    )  # fmt: skip
    index.add_argument("--serve", metavar="DIR", help="also save a retriever folder for metrank serve")
    index.add_argument("--model", help="with --serve: the model that made the embeddings (for text/image queries)")
    index.set_defaults(func=run_index)
    evaluate = commands.add_parser(
        "evaluate", help="exact R@K/MAP@R, or i2t/t2i recall, with the gallery sharded over Ray actors"
    )
    evaluate.add_argument("--query", help="query embeddings (class-label mode)")
    evaluate.add_argument("--labels", help="class label of each query")
    evaluate.add_argument(
        "--gallery-shard", nargs=2, action="append", metavar=("VECTORS", "LABELS"),
        help="one gallery shard (repeat, in gallery order); default: leave-one-out on the queries",
    )  # fmt: skip
    evaluate.add_argument("--no-map", action="store_true", help="skip MAP@R and R-precision")
    evaluate.add_argument("--images", help="image embeddings (image-text mode)")
    evaluate.add_argument("--texts", help="caption embeddings")
    evaluate.add_argument("--text-image-ids", help="image row of each caption")
    evaluate.add_argument("--image-labels", help="optional: images with equal labels count as the same image")
    evaluate.add_argument("--shards", type=int, help="image-text mode: shards per side (default: one per CPU, <= 8)")
    evaluate.add_argument("--ks", type=int, nargs="+", help="K values (default 1 2 4 8; 1 5 10 for image-text)")
    evaluate.set_defaults(func=run_evaluate)


def run_index(args: argparse.Namespace) -> int:

    spec = args.spec
    if spec == "auto":
        files = shard_files(args.shards)
        n = sum(len(read_shard_ids(path)) for path in files)
        _, sample, _ = read_shard(files[0])
        spec = choose_index(n, sample.shape[1], int(args.memory_gib * 2**30), sample=sample[:50_000]).spec
    index = build_index(args.shards, args.out, spec=spec, train_size=args.train_size, on_disk=args.on_disk)
    print(f"built {index.spec!r} with {index.ntotal} vectors -> {args.out}/")
    if args.serve:
        to_retriever(args.out, model=args.model).save(args.serve)
        print(f"retriever saved -> {args.serve}/ (metrank serve {args.serve})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:

    if args.images or args.texts or args.text_image_ids:
        if not (args.images and args.texts and args.text_image_ids) or args.query or args.labels:
            raise InputError("image-text mode needs --images, --texts and --text-image-ids (and no --query/--labels)")
        images = load_embeddings(args.images)
        texts = load_embeddings(args.texts, dim=images.shape[1])
        ids = load_labels(args.text_image_ids, len(texts))
        image_labels = load_labels(args.image_labels, len(images)) if args.image_labels else None
        ks = tuple(args.ks or (1, 5, 10))
        print(format_table(image_text_metrics(images, texts, ids, ks, image_labels, n_shards=args.shards)))
        return 0
    if not (args.query and args.labels):
        raise InputError("give --query and --labels, or --images, --texts and --text-image-ids (image-text mode)")
    shards = None
    if args.gallery_shard:
        shards = []
        for vectors, labels in args.gallery_shard:
            embeddings = load_embeddings(vectors)
            shards.append((embeddings, load_labels(labels, len(embeddings))))
    query = load_embeddings(args.query)
    labels = load_labels(args.labels, len(query))
    ks = tuple(args.ks or (1, 2, 4, 8))
    print(format_table(retrieval_metrics(query, labels, shards, ks=ks, map_at_r=not args.no_map)))
    return 0
