"""Frozen-tower baselines that training must beat, on the same data, features and metrics as the training configs.

* image-text configs (``task: image_text``): a ridge-regression map from frozen image-backbone features to frozen
  text-backbone features, fitted on the training identities, evaluated on the test ones. Both feature sets are
  centred with the training means; ``lambda`` is chosen on a held-out 20% of the training identities (by t2i R@1),
  then the map is refitted on all training identities. Retrieval compares text features with mapped image features
  (cosine), through ``metrank.metrics.image_text_metrics`` exactly as training evaluates.
* metric configs (``task: metric``): the raw frozen image-backbone features (L2-normalised), Recall@K through
  ``metrank.metrics.retrieval_metrics`` (leave-one-out on the test split, as training evaluates); for data with
  two views (emoji vendors) also view B -> view A.

Features come from the training feature cache (:mod:`metrank.training.feature_cache`): computed at most once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from metrank.distributed import resolve_device
from metrank.encoders import create_model
from metrank.metrics import image_text_metrics, retrieval_metrics
from metrank.training.config import TrainConfig
from metrank.training.feature_sets import (
    LabelFeatures,
    PairFeatures,
    carve_validation,
    features,
    open_dataset,
    select_rows,
)

LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_map(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``W = argmin ||x W - y||^2 + lam ||W||^2 = (x^T x + lam I)^-1 x^T y`` (float64 solve)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x64.T @ x64 + lam * np.eye(x.shape[1]), x64.T @ y64).astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge_metrics(train: PairFeatures, test: PairFeatures, lam: float, ks: Sequence[int]) -> dict[str, float]:
    """Fit the ridge map on ``train`` (one row per caption: its image's features -> its text features), evaluate on
    ``test``."""
    x_img, y_txt = train.image.numpy(), train.text.numpy()
    x = x_img[train.caption_image.numpy()]
    mx, my = x.mean(0), y_txt.mean(0)
    w = ridge_map(x - mx, y_txt - my, lam)
    mapped = normalise((test.image.numpy() - mx) @ w)
    text = normalise(test.text.numpy() - my)
    return image_text_metrics(
        mapped, text, test.caption_image.numpy(), ks=tuple(ks), image_labels=test.image_ids.numpy(), progress=False
    )


def image_text_baseline(cfg: TrainConfig, model: Any, device: Any) -> dict[str, dict[str, float]]:
    train_sel = select_rows(cfg, open_dataset(cfg, cfg.data.train_split), "train")
    test_sel = select_rows(cfg, open_dataset(cfg, cfg.data.eval_split), "test")
    fit_sel, val_sel = carve_validation(train_sel, 0.2, cfg.train.seed)
    assert val_sel is not None
    fit, val = (cast(PairFeatures, features(model, s, cfg, device)) for s in (fit_sel, val_sel))
    train, test = (cast(PairFeatures, features(model, s, cfg, device)) for s in (train_sel, test_sel))
    scores = {lam: ridge_metrics(fit, val, lam, cfg.eval.ks)["t2i_R@1"] for lam in LAMBDAS}
    best = max(scores, key=lambda lam: scores[lam])
    return {f"frozen ridge (lambda={best})": ridge_metrics(train, test, best, cfg.eval.ks)}


def view_metrics(
    emb: np.ndarray, labels: np.ndarray, views: np.ndarray | None, ks: Sequence[int], prefix: str
) -> dict[str, dict[str, float]]:
    """Leave-one-out Recall@K, and for data with exactly two views (emoji vendors) view B -> view A."""
    rows = {f"{prefix}, leave-one-out": retrieval_metrics(emb, labels, ks=tuple(ks), progress=False)}
    if views is not None and len(views) == len(labels):
        names = sorted(set(views.tolist()))
        if len(names) == 2:
            q, g = views == names[1], views == names[0]
            rows[f"{prefix}, {names[1]} -> {names[0]}"] = retrieval_metrics(
                emb[q], labels[q], emb[g], labels[g], ks=tuple(ks), progress=False
            )
    return rows


def eval_views(dataset: Any, cfg: TrainConfig) -> np.ndarray | None:
    """Views of the evaluated items (None when the dataset has none or a subset is used)."""
    if dataset.views is None or cfg.data.max_classes is not None or cfg.data.max_per_class is not None:
        return None
    return np.asarray(dataset.views)


def metric_baseline(cfg: TrainConfig, model: Any, device: Any) -> dict[str, dict[str, float]]:
    dataset = open_dataset(cfg, cfg.data.eval_split)
    test = cast(LabelFeatures, features(model, select_rows(cfg, dataset, "test"), cfg, device))
    return view_metrics(
        normalise(test.image.numpy()), test.labels.numpy(), eval_views(dataset, cfg), cfg.eval.ks, "frozen features"
    )


def frozen_baselines(cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The baseline rows of ``cfg`` (ridge map for image-text, raw features for metric learning)."""

    device = resolve_device(cfg.train.device)
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.kwargs).to(device).eval()
    return (image_text_baseline if cfg.task == "image_text" else metric_baseline)(cfg, model, device)


def ridge_transfer(source: TrainConfig, target: TrainConfig) -> dict[str, float]:
    """Zero-shot transfer of the ridge baseline: the map (and centring) fitted on the frozen features of
    ``source``'s training split (lambda chosen there as in :func:`image_text_baseline`), applied to ``target``'s test
    split. Both configs must use the same model (the same frozen backbones)."""

    device = resolve_device(source.train.device)
    model = create_model(source.model.name, pretrained=source.model.pretrained, **source.model.kwargs).to(device)
    model.eval()
    train_sel = select_rows(source, open_dataset(source, source.data.train_split), "train")
    fit_sel, val_sel = carve_validation(train_sel, 0.2, source.train.seed)
    assert val_sel is not None
    fit, val, train = (cast(PairFeatures, features(model, s, source, device)) for s in (fit_sel, val_sel, train_sel))
    scores = {lam: ridge_metrics(fit, val, lam, source.eval.ks)["t2i_R@1"] for lam in LAMBDAS}
    best = max(scores, key=lambda lam: scores[lam])
    test_sel = select_rows(target, open_dataset(target, target.data.eval_split), "test")
    test = cast(PairFeatures, features(model, test_sel, target, device))
    return ridge_metrics(train, test, best, target.eval.ks)
