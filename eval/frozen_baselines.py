"""Frozen-tower baselines that training must beat, on the same data, features and metrics as the training configs.

* image-text configs (``task: image_text``): a ridge-regression map from frozen image-backbone features to frozen
  text-backbone features, fitted on the training identities, evaluated on the held-out ones. Both feature sets are
  centred with the training means; ``lambda`` is chosen on a held-out 20% of the training identities (by t2i R@1),
  then the map is refitted on all training identities. Retrieval compares text features with mapped image features
  (cosine), through ``metrank.metrics.image_text_metrics`` exactly as training evaluates.
* metric configs (``task: metric``): the raw frozen image-backbone features (L2-normalised), Recall@K through
  ``metrank.metrics.retrieval_metrics`` (leave-one-out on the held-out split, as training evaluates); for data with
  two views (emoji vendors) also view A -> view B.

Features come from the training feature cache (``metrank.training``), so they are computed at most once.

    python eval/frozen_baselines.py train/configs/emoji_image_text.yaml
    python eval/frozen_baselines.py train/configs/emoji_instance.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from metrank.metrics import format_table, image_text_metrics, retrieval_metrics
from metrank.training import load_config
from metrank.training.feature_sets import PairFeatures, label_features, open_dataset, pair_features
from metrank.training.trainer import select_device

LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_map(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``W = argmin ||x W - y||^2 + lam ||W||^2 = (x^T x + lam I)^-1 x^T y`` (float64 solve)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x64.T @ x64 + lam * np.eye(x.shape[1]), x64.T @ y64).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge_metrics(train: PairFeatures, test: PairFeatures, lam: float, ks: Sequence[int]) -> dict[str, float]:
    """Fit the ridge map on ``train`` (one row per caption: its image's features -> its text features), evaluate on
    ``test``."""
    x_img, y_txt = train.image.numpy(), train.text.numpy()
    x = x_img[train.caption_image.numpy()]
    mx, my = x.mean(0), y_txt.mean(0)
    w = ridge_map(x - mx, y_txt - my, lam)
    mapped = _normalise((test.image.numpy() - mx) @ w)
    text = _normalise(test.text.numpy() - my)
    return image_text_metrics(
        mapped, text, test.caption_image.numpy(), ks=tuple(ks), image_labels=test.image_ids.numpy(), progress=False
    )


def split_identities(feats: PairFeatures, fraction: float, seed: int = 0) -> tuple[PairFeatures, PairFeatures]:
    """Class-disjoint (fit, validation) split of a training feature set by identity."""
    ids = feats.image_ids.numpy()
    classes = np.unique(ids)
    val_classes = np.random.default_rng(seed).permutation(classes)[: max(1, int(round(fraction * len(classes))))]
    parts = []
    for keep in (~np.isin(ids, val_classes), np.isin(ids, val_classes)):
        images = np.flatnonzero(keep)
        new_index = np.full(len(ids), -1)
        new_index[images] = np.arange(len(images))
        captions = np.flatnonzero(new_index[feats.caption_image.numpy()] >= 0)
        parts.append(
            PairFeatures(
                image=feats.image[images],
                text=feats.text[captions],
                caption_image=torch.from_numpy(new_index[feats.caption_image.numpy()[captions]]),
                image_ids=feats.image_ids[images],
            )
        )
    return parts[0], parts[1]


def image_text_baseline(cfg, model, device) -> dict[str, dict[str, float]]:
    train = pair_features(model, open_dataset(cfg, cfg.data.train_split), cfg, cfg.data.train_split, device)
    test = pair_features(model, open_dataset(cfg, cfg.data.eval_split), cfg, cfg.data.eval_split, device)
    fit, val = split_identities(train, 0.2)
    scores = {lam: ridge_metrics(fit, val, lam, cfg.eval.ks)["t2i_R@1"] for lam in LAMBDAS}
    best = max(scores, key=scores.get)
    print(f"ridge lambda chosen on 20% of the training identities: {best} (val t2i R@1 by lambda: {scores})")
    return {f"frozen ridge (lambda={best})": ridge_metrics(train, test, best, cfg.eval.ks)}


def view_metrics(
    emb: np.ndarray, labels: np.ndarray, views, ks: Sequence[int], prefix: str
) -> dict[str, dict[str, float]]:
    """Leave-one-out Recall@K, and for data with exactly two views (emoji vendors) view B -> view A."""
    rows = {f"{prefix}, leave-one-out": retrieval_metrics(emb, labels, ks=tuple(ks), progress=False)}
    if views is not None and len(views) == len(labels):
        views = np.asarray(views)
        names = sorted(set(views.tolist()))
        if len(names) == 2:
            q, g = views == names[1], views == names[0]
            rows[f"{prefix}, {names[1]} -> {names[0]}"] = retrieval_metrics(
                emb[q], labels[q], emb[g], labels[g], ks=tuple(ks), progress=False
            )
    return rows


def eval_views(dataset, cfg) -> np.ndarray | None:
    """Views of the evaluated items (None when the dataset has none or a subset is used)."""
    views = getattr(dataset, "views", None)
    if views is None or cfg.data.max_classes is not None or cfg.data.max_per_class is not None:
        return None
    return np.asarray(views)


def metric_baseline(cfg, model, device) -> dict[str, dict[str, float]]:
    dataset = open_dataset(cfg, cfg.data.eval_split)
    test = label_features(model, dataset, cfg, cfg.data.eval_split, device)
    return view_metrics(
        _normalise(test.image.numpy()), test.labels.numpy(), eval_views(dataset, cfg), cfg.eval.ks, "frozen features"
    )


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a training config (train/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for metrank train")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    from metrank.encoders import create_model

    device = select_device(cfg.train.device)
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.kwargs).to(device).eval()
    rows = (image_text_baseline if cfg.task == "image_text" else metric_baseline)(cfg, model, device)
    print(format_table(list(rows.values()), names=list(rows)))
    print(f"({'recalls in percent' if cfg.task == 'image_text' else 'fractions'}; {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
