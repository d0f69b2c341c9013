"""``metrank evaluate``: retrieval metrics for saved embeddings.

Class-label mode (Recall@K, P@K, MAP@R, R-precision)::

    metrank evaluate --query emb.npz:embeddings --labels emb.npz:labels [--gallery G --gallery-labels GL]

Image-text mode (i2t/t2i R@1/5/10, RSUM, median/mean rank; ``--coco-1k`` adds the five-fold 1K average)::

    metrank evaluate --images img.npy --texts txt.npy --text-image-ids ids.npy

Arrays are ``.npy``/``.npz``/``.pt`` files, ``path:key`` selects an array inside an archive. Prints a table and, with
``--json``, writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from metrank.atomic import atomic_write_text
from metrank.embeddings_io import load_embeddings, load_labels
from metrank.errors import InputError
from metrank.metrics import coco_1k_folds, format_table, image_text_metrics, retrieval_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    labels = parser.add_argument_group("class-label retrieval")
    labels.add_argument("--query", help="query embeddings (and the gallery when --gallery is absent)")
    labels.add_argument("--labels", help="class label of each query")
    labels.add_argument("--gallery", help="separate gallery embeddings (In-Shop style); default: leave-one-out")
    labels.add_argument("--gallery-labels", help="class label of each gallery item")
    labels.add_argument(
        "--ks", type=int, nargs="+", default=None, help="K values (default 1 2 4 8; 1 5 10 for image-text)"
    )
    labels.add_argument(
        "--no-map", action="store_true", help="skip MAP@R and R-precision (they need k = largest class size)"
    )
    pairs = parser.add_argument_group("image-text retrieval")
    pairs.add_argument("--images", help="image embeddings")
    pairs.add_argument("--texts", help="caption embeddings")
    pairs.add_argument("--text-image-ids", help="image row of each caption")
    pairs.add_argument("--image-labels", help="optional: images with equal labels count as the same image")
    pairs.add_argument("--coco-1k", action="store_true", help="also report the mean over five 1K-image folds")
    parser.add_argument("--metric", choices=("ip", "l2"), default="ip", help="inner product (default) or L2")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise embeddings first (cosine)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--json", help="write the metrics to this JSON file")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Recall@K / MAP@R / image-text recall of saved embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _normalized(x: np.ndarray, enabled: bool) -> np.ndarray:
    if not enabled:
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError("--normalize: some embeddings are all zeros and cannot be normalised")
    return x / norms


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation the arguments describe; returns ``{"mode": ..., "metrics": {...}}``."""
    if args.images or args.texts or args.text_image_ids:
        if not (args.images and args.texts and args.text_image_ids):
            raise InputError("image-text mode needs --images, --texts and --text-image-ids together")
        if args.query or args.labels:
            raise InputError("use either --query/--labels (class labels) or --images/--texts (image-text), not both")
        images = _normalized(load_embeddings(args.images), args.normalize)
        texts = _normalized(load_embeddings(args.texts, dim=images.shape[1]), args.normalize)
        ids = load_labels(args.text_image_ids, len(texts))
        image_labels = load_labels(args.image_labels, len(images)) if args.image_labels else None
        options = dict(
            ks=tuple(args.ks or (1, 5, 10)), image_labels=image_labels, metric=args.metric, device=args.device
        )
        result: dict[str, object] = {"mode": "image-text", "metrics": image_text_metrics(images, texts, ids, **options)}
        if args.coco_1k:
            result["coco_1k"] = coco_1k_folds(images, texts, ids, **options)
        return result
    if not (args.query and args.labels):
        raise InputError(
            "give --query and --labels (class-label mode) or --images, --texts and --text-image-ids (image-text mode)"
        )
    if bool(args.gallery) != bool(args.gallery_labels):
        raise InputError("--gallery and --gallery-labels go together")
    query = _normalized(load_embeddings(args.query), args.normalize)
    labels = load_labels(args.labels, len(query))
    gallery = gallery_labels = None
    if args.gallery:
        gallery = _normalized(load_embeddings(args.gallery, dim=query.shape[1]), args.normalize)
        gallery_labels = load_labels(args.gallery_labels, len(gallery))
    metrics = retrieval_metrics(
        query,
        labels,
        gallery,
        gallery_labels,
        ks=tuple(args.ks or (1, 2, 4, 8)),
        metric=args.metric,
        map_at_r=not args.no_map,
        device=args.device,
    )
    return {"mode": "leave-one-out" if gallery is None else "query-gallery", "metrics": metrics}


def _write_json(path: str, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    tables = [("", result["metrics"])] + (
        [("COCO 1K (mean of 5 folds)", result["coco_1k"])] if "coco_1k" in result else []
    )
    for title, metrics in tables:
        print((title + "\n" if title else "") + format_table(metrics))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
