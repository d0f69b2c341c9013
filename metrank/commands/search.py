"""``metrank embed | index | search | serve``: embed items, build a saved Retriever, query it, serve it over HTTP.

metrank embed --model lite0-minilm --images photos/ --out emb          # emb.npy + emb.jsonl
metrank index my_index --model lite0-minilm --images photos/            # or --texts captions.csv
metrank index my_index --vectors emb.npy --items emb.jsonl              # from precomputed vectors
metrank search my_index --text "a red car" -k 5 --filter folder=cars
metrank serve my_index --port 8000 --api-key SECRET --allowed-host search.example.org

Writes to a saved index (``index`` extending it, HTTP adds/removes under ``serve``) are committed to its SQLite
store before they are acknowledged; ``serve`` snapshots the index in the background and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from metrank.atomic import atomic_path, atomic_write_text
from metrank.errors import InputError, MissingFileError
from metrank.scale.embed import embed
from metrank.search import Retriever
from metrank.search.retriever import MANIFEST
from metrank.search.server import check_megabytes, check_port, serve
from metrank.search.sources import parse_scalar, read_items


def register(subparsers: argparse._SubParsersAction) -> None:
    source_help = (
        "a folder of images, or a .csv/.jsonl (image column: image|path|file; text column: "
        "text|caption|name; other columns become metadata), or .txt (texts, one per line)"
    )

    embed = subparsers.add_parser("embed", help="embed images or texts to a .npy file (+ .jsonl item list)")
    embed.add_argument("--model", required=True, help="model name (lite0-minilm) or checkpoint path")
    _add_source_args(embed, source_help)
    embed.add_argument("--out", required=True, help="output prefix: writes OUT.npy and OUT.jsonl")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument(
        "--ray", type=int, metavar="N", help="embed on N Ray Data actors into OUT/shard-*.parquet (resumable)"
    )
    embed.add_argument("--gpus", action="store_true", help="with --ray: one GPU per actor")
    embed.add_argument("--shard-size", type=int, default=10_000, help="with --ray: items per Parquet shard")
    embed.set_defaults(func=run_embed)

    index = subparsers.add_parser("index", help="build (or extend) a saved search index directory")
    index.add_argument("directory", help="retriever directory (created, or extended if it exists)")
    index.add_argument("--model", help="model name or checkpoint path (needed for images/texts and text queries)")
    group = _add_source_args(index, source_help)
    group.add_argument("--vectors", help=".npy [n, dim] precomputed embeddings (e.g. from metrank embed)")
    index.add_argument("--items", help="with --vectors: .jsonl item list from metrank embed (paths/texts/metadata)")
    index.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="folder whose images may be indexed by path and served (the --images folder, or the folder of the "
        "item list, is declared already); repeat for several",
    )
    index.add_argument("--index-spec", default="Flat", help="FAISS factory string or short name (default Flat)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--hubness", choices=["qb_norm", "nnn"], help="enable query-time hubness correction")
    index.add_argument("--bank", help="query bank for --hubness: .npy vectors or .txt/.csv/.jsonl texts to embed")
    index.add_argument(
        "--hubness-modality",
        choices=["image", "text", "vector"],
        help="gallery items the correction covers (default: all)",
    )
    index.add_argument(
        "--hubness-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. beta=20 (qb_norm), alpha=0.75 or k=16 (nnn)",
    )
    index.set_defaults(func=run_index)

    search = subparsers.add_parser("search", help="query a saved index and print the best matches")
    search.add_argument("directory")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", help="query image file")
    query.add_argument(
        "--vector",
        help=".npy file (first row) or comma-separated floats (write --vector=-0.1,... when the first is negative)",
    )
    search.add_argument("-k", type=int, default=10)
    search.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata filter; repeat for AND, repeat a key for OR (a=1 --filter a=2)",
    )
    search.add_argument("--modality", choices=["image", "text", "vector"], help="restrict results to one kind")
    search.add_argument("--no-hubness", action="store_true", help="skip the index's hubness correction")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.set_defaults(func=run_search)

    serve = subparsers.add_parser(
        "serve", help="serve a saved index over HTTP (search page at /, schema at /openapi.json)"
    )
    serve.add_argument("directory")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name clients use besides loopback and --host (DNS rebinding protection); repeat; '*' = any",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("METRANK_API_KEY"),
        help="require this X-API-Key header (default: $METRANK_API_KEY, else none)",
    )
    serve.add_argument("--max-upload-mb", type=float, default=16.0)
    serve.add_argument("--max-request-mb", type=float, default=8.0)
    serve.add_argument(
        "--snapshot-every", type=int, default=1000, metavar="WRITES", help="snapshot the index after this many writes"
    )
    serve.set_defaults(func=run_serve)


def _add_source_args(parser: argparse.ArgumentParser, source_help: str) -> argparse._MutuallyExclusiveGroup:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--images", help=source_help)
    group.add_argument("--texts", help=source_help)
    return group


def _pairs(values: list[str], what: str) -> dict[str, Any]:

    out: dict[str, Any] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise InputError(f"{what} {value!r} must look like key=value")
        parsed = parse_scalar(raw)
        if key in out:  # repeated key: any of the values
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [parsed]
        else:
            out[key] = parsed
    return out


def _read_source(args: argparse.Namespace) -> tuple[str, Any]:

    kind = "image" if args.images else "text"
    return kind, read_items(args.images or args.texts, kind)


# ------------------------------------------------------------------------------------------------ embed
def run_embed(args: argparse.Namespace) -> int:

    if args.ray:
        kind = "image" if args.images else "text"
        source = args.images or args.texts
        done = embed(source, args.out, args.model, kind, args.ray, args.gpus, args.shard_size, args.batch_size)
        print(
            f"embedded {done['n_items']} {kind}s -> {args.out}/ ({len(done['shards'])} shards, {done['skipped']} kept)"
        )
        return 0
    kind, items = _read_source(args)
    retriever = Retriever.create(model=args.model)
    vectors = (
        retriever.embed_images(items.images, args.batch_size)
        if kind == "image"
        else retriever.embed_texts(items.texts, args.batch_size)
    )
    _save_npy(args.out + ".npy", vectors)
    rows = [{"id": i, kind: (items.images or items.texts)[i], "metadata": items.metadata[i]} for i in range(len(items))]
    atomic_write_text(args.out + ".jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"embedded {len(items)} {kind}s -> {args.out}.npy {vectors.shape}, {args.out}.jsonl")
    return 0


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------------------------ index
def run_index(args: argparse.Namespace) -> int:

    if args.items and not args.vectors:
        raise InputError("--items goes with --vectors")
    vectors = np.load(args.vectors) if args.vectors else None
    if os.path.exists(os.path.join(args.directory, MANIFEST)):
        retriever = Retriever.load(args.directory)
        print(f"extending {args.directory} ({len(retriever)} items)")
    else:
        dim = int(vectors.shape[1]) if vectors is not None and vectors.ndim == 2 else None
        retriever = Retriever.create(model=args.model, index_spec=args.index_spec, dim=None if args.model else dim)
    for root in _media_roots(args):
        retriever.add_media_root(root)
    kw: dict[str, Any] = {}
    if vectors is not None:
        kw, count = _vector_items(args.items, vectors)
    else:
        kind, items = _read_source(args)
        kw = {"images": items.images} if kind == "image" else {"texts": items.texts}
        kw["metadata"] = items.metadata
        count = len(items)
        if not retriever.index.is_trained:  # IVF/PQ: train on the embeddings of everything being indexed
            kw["vectors"] = (
                retriever.embed_images(items.images, args.batch_size)
                if kind == "image"
                else retriever.embed_texts(items.texts, args.batch_size)
            )
    if not retriever.index.is_trained:
        print(f"training {retriever.index_spec} on {len(kw['vectors'])} vectors")
        retriever.train(kw["vectors"])
    retriever.add(batch_size=args.batch_size, **kw)
    if args.hubness:
        retriever.set_hubness(
            args.hubness,
            bank=_bank(retriever, args.bank),
            modality=args.hubness_modality,
            **_pairs(args.hubness_param, "--hubness-param"),
        )
    snapshot = retriever.save(args.directory)
    print(f"indexed {count} items -> {snapshot} ({len(retriever)} items in total)")
    return 0


def _media_roots(args: argparse.Namespace) -> list[str]:
    """Folders the user named for this index: --media-root, the --images folder or the item list's folder."""
    roots = list(args.media_root)
    source = args.images or args.items
    if source:
        roots.append(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
    return roots


def _vector_items(items_path: str | None, vectors: np.ndarray) -> tuple[dict[str, Any], int]:
    if vectors.ndim != 2:
        raise InputError(f"--vectors must hold a 2-D [n, dim] array, got shape {vectors.shape}")
    kw: dict[str, Any] = {"vectors": vectors.astype(np.float32)}
    if items_path:
        with open(items_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != len(vectors):
            raise InputError(f"{items_path} lists {len(rows)} items but the vectors have {len(vectors)} rows")
        kw["metadata"] = [r.get("metadata", {}) for r in rows]
        if all("image" in r for r in rows):
            kw["images"] = [r["image"] for r in rows]
        elif all("text" in r for r in rows):
            kw["texts"] = [r["text"] for r in rows]
    return kw, len(vectors)


def _bank(retriever, source: str | None) -> np.ndarray:
    if not source:
        raise InputError("--hubness needs --bank (reference queries: .npy vectors or a text list)")
    if source.endswith(".npy"):
        return np.load(source).astype(np.float32)

    return retriever.embed_texts(read_items(source, "text").texts)


# ------------------------------------------------------------------------------------------------ search
def run_search(args: argparse.Namespace) -> int:

    retriever = Retriever.load(args.directory)
    vector = None
    if args.vector is not None:
        if args.vector.endswith(".npy"):
            vector = np.atleast_2d(np.load(args.vector))[0].astype(np.float32)
        else:
            try:
                vector = np.array([float(v) for v in args.vector.split(",")], dtype=np.float32)
            except ValueError:
                raise InputError("--vector must be a .npy file or comma-separated numbers") from None
    if args.image is not None and not os.path.isfile(args.image):
        raise MissingFileError(f"query image {args.image!r} not found")
    hits = retriever.search(
        text=args.text,
        image=args.image,
        vector=vector,
        k=args.k,
        filter=_pairs(args.filter, "--filter") or None,
        modality=args.modality,
        hubness=not args.no_hubness,
    )
    if args.json:
        print(json.dumps([h.to_dict(with_path=True) for h in hits], ensure_ascii=False, indent=1))
        return 0
    rows = [("rank", "id", "score", "modality", "item", "metadata")]
    for rank, hit in enumerate(hits, 1):
        item = hit.text or (os.path.basename(hit.path) if hit.path else "")
        rows.append(
            (
                str(rank),
                str(hit.id),
                f"{hit.score:.4f}",
                hit.modality,
                item,
                json.dumps(hit.metadata, ensure_ascii=False),
            )
        )
    widths = [min(60, max(len(r[c]) for r in rows)) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell[:60].ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not hits:
        print("(no matches)")
    return 0


# ------------------------------------------------------------------------------------------------ serve
def run_serve(args: argparse.Namespace) -> int:

    port = check_port(args.port)
    max_upload = check_megabytes(args.max_upload_mb, "--max-upload-mb")
    max_request = check_megabytes(args.max_request_mb, "--max-request-mb")
    if args.snapshot_every < 1:
        raise InputError("--snapshot-every must be at least 1")
    retriever = Retriever.load(args.directory)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can add and remove items")
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        print("note: only loopback host names are answered; add --allowed-host NAME for the names clients use")
    print(f"serving {args.directory} ({len(retriever)} items) at http://{args.host}:{port}/ (schema: /openapi.json)")
    serve(
        retriever,
        host=args.host,
        port=port,
        api_key=args.api_key,
        max_upload_bytes=max_upload,
        max_request_bytes=max_request,
        allowed_hosts=args.allowed_host,
        snapshot_every_writes=args.snapshot_every,
    )
    return 0
