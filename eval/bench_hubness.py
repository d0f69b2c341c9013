"""Effect of query-time hubness correction (QB-Norm / NNN, ``metrank.search.hubness``) on held-out emoji
name <-> image retrieval, through ``Retriever.search_vectors``.

Protocol: emoji identities are split class-disjointly (``metrank.data`` "emoji": train / test); train identities are
split again 80/20 into fit / validation. Embeddings come from a trained checkpoint (``--checkpoint``) or, by default,
from the frozen lite0-minilm towers with a ridge-regression map from MiniLM text features to centred Lite0 image
features fitted on the fit identities (SPEC section 5 baseline). The query bank is the fit split's queries (names for
text->image, images for image->text); hyper-parameters (beta, alpha, k) are chosen on validation and reported on the
test identities (gallery: Google images; queries: names). Also prints the hubness of the gallery (skewness of the
10-occurrence distribution N_10; lower = fewer hubs).

    python eval/bench_hubness.py                      # frozen towers + ridge map
    python eval/bench_hubness.py --checkpoint runs/emoji/best.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from metrank.data import create_dataset, open_rgb
from metrank.metrics import format_table
from metrank.search import Retriever

GRID = [("qb_norm", {"beta": b}) for b in (5.0, 10.0, 20.0, 50.0)] + [
    ("nnn", {"alpha": a, "k": k}) for a in (0.25, 0.5, 0.75, 1.0) for k in (4, 16, 64)
]


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@torch.no_grad()
def frozen_features(model, images: list[str], captions: list[str], batch_size: int = 64) -> tuple[np.ndarray, ...]:
    model.eval()
    image_parts, text_parts = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="image features"):
        pixels = torch.stack([model.image_transform(open_rgb(p)) for p in images[start : start + batch_size]])
        image_parts.append(model.image_features(pixels).float().numpy())
    for start in tqdm(range(0, len(captions), 256), desc="text features"):
        text_parts.append(model.text_features(model.tokenize(captions[start : start + 256])).float().numpy())
    return np.concatenate(image_parts), np.concatenate(text_parts)


def load_split(split: str, vendor: str) -> tuple[list[str], list[str], np.ndarray]:
    """One (image, name, identity) per identity, images of ``vendor``."""
    data = create_dataset("emoji", split=split)
    keep = [i for i, v in enumerate(data.image_views) if v == vendor]
    captions = {int(data.caption_image[c]): data.captions[c] for c in range(len(data.captions))}
    return [data.images[i] for i in keep], [captions[i] for i in keep], np.asarray(data.image_labels)[keep]


def embeddings(args) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (image_emb, text_emb, labels)} for fit / val / test."""
    train_images, train_names, train_labels = load_split("train", args.vendor)
    test_images, test_names, test_labels = load_split("test", args.vendor)
    rng = np.random.default_rng(args.seed)
    identities = np.unique(train_labels)
    val_ids = rng.choice(identities, int(0.2 * len(identities)), replace=False)
    is_val = np.isin(train_labels, val_ids)
    if args.checkpoint:
        from metrank.encoders import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        embed = {"images": lambda p: model.embed_images(p, progress=True), "texts": lambda t: model.embed_texts(t)}
        img_train, img_test = embed["images"](train_images), embed["images"](test_images)
        txt_train, txt_test = embed["texts"](train_names), embed["texts"](test_names)
    else:
        cache = os.path.join(args.cache, f"emoji_frozen_{args.vendor}_{args.image_size}px.npz")
        if os.path.exists(cache):
            feats = dict(np.load(cache))
        else:
            from metrank.encoders import create_model

            model = create_model("lite0-minilm", image_size=args.image_size)
            feats = {}
            feats["img_train"], feats["txt_train"] = frozen_features(model, train_images, train_names)
            feats["img_test"], feats["txt_test"] = frozen_features(model, test_images, test_names)
            os.makedirs(args.cache, exist_ok=True)
            np.savez(cache + ".tmp.npz", **feats)
            os.replace(cache + ".tmp.npz", cache)
        fit = ~is_val
        mean = feats["img_train"][fit].mean(0)
        target = _normalise(feats["img_train"][fit] - mean)
        source = _normalise(feats["txt_train"][fit])
        w = np.linalg.solve(source.T @ source + args.ridge * np.eye(source.shape[1]), source.T @ target)
        img_train, img_test = _normalise(feats["img_train"] - mean), _normalise(feats["img_test"] - mean)
        txt_train, txt_test = (
            _normalise(_normalise(feats["txt_train"]) @ w),
            _normalise(_normalise(feats["txt_test"]) @ w),
        )
    return {
        "fit": (img_train[~is_val], txt_train[~is_val], train_labels[~is_val]),
        "val": (img_train[is_val], txt_train[is_val], train_labels[is_val]),
        "test": (img_test, txt_test, test_labels),
    }


def recall(
    retriever: Retriever, queries: np.ndarray, query_labels: np.ndarray, gallery_labels: dict[int, int], ks=(1, 5, 10)
) -> dict[str, float]:
    rows = retriever.search_vectors(queries, k=max(ks))
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(
            np.mean([any(gallery_labels[h.id] == q for h in row[:k]) for row, q in zip(rows, query_labels)])
        )
    top10 = np.array([[h.id for h in row[:10]] for row in rows]).ravel()
    counts = np.bincount(top10, minlength=len(gallery_labels)).astype(np.float64)
    out["N10_skew"] = float(((counts - counts.mean()) ** 3).mean() / counts.std() ** 3)
    return out


def evaluate(direction: str, data, method: str | None, params: dict, split: str) -> dict[str, float]:
    images, texts, labels = data[split]
    fit_images, fit_texts, _ = data["fit"]
    gallery, queries, bank = (images, texts, fit_texts) if direction == "t2i" else (texts, images, fit_images)
    retriever = Retriever.create(dim=gallery.shape[1])
    ids = retriever.add(vectors=gallery, progress=False)
    if method:
        retriever.set_hubness(method, bank=bank, **params)
    return recall(retriever, queries, labels, dict(zip(ids.tolist(), labels.tolist())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="trained RetrievalModel checkpoint (default: frozen towers + ridge map)")
    parser.add_argument("--vendor", default="google")
    parser.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the text->image map")
    parser.add_argument("--image-size", type=int, default=128, help="frozen-tower input size (as the emoji config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "metrank", "features"))
    args = parser.parse_args(argv)
    data = embeddings(args)
    print(
        f"fit {len(data['fit'][2])} / val {len(data['val'][2])} / test {len(data['test'][2])} identities; "
        f"embeddings: {'checkpoint ' + args.checkpoint if args.checkpoint else 'frozen towers + ridge map'}"
    )
    rows = []
    for direction in ("t2i", "i2t"):
        base = evaluate(direction, data, None, {}, "test")
        rows.append({"direction": direction, "method": "none", "params": "-", **base})
        for method in ("qb_norm", "nnn"):
            grid = [(m, p) for m, p in GRID if m == method]
            scored = [(evaluate(direction, data, m, p, "val")["R@1"], i) for i, (m, p) in enumerate(grid)]
            best = grid[max(scored)[1]][1]
            result = evaluate(direction, data, method, best, "test")
            rows.append(
                {
                    "direction": direction,
                    "method": method,
                    "params": ",".join(f"{k}={v:g}" for k, v in best.items()),
                    **result,
                }
            )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
