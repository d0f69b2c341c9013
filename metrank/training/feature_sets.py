"""Datasets -> cached frozen-backbone features for the two training tasks.

``image_text``: an ``ImageTextDataset`` (images, captions, caption -> image, identity per image) becomes
:class:`PairFeatures`; ``metric``: an ``ImageLabelDataset`` becomes :class:`LabelFeatures`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from metrank import distributed
from metrank.errors import InputError
from metrank.training.config import TrainConfig
from metrank.training.feature_cache import (
    cached,
    compute_image_features,
    compute_text_features,
    feature_cache_key,
    image_fingerprint,
    text_fingerprint,
)


@dataclass
class PairFeatures:
    """Backbone features of an image-text split. Caption ``c`` describes image ``caption_image[c]``; images sharing
    an ``image_ids`` value (the same identity, e.g. one emoji drawn by two vendors) are not negatives of each other."""

    image: torch.Tensor  # [n_images, F_image]
    text: torch.Tensor  # [n_captions, F_text]
    caption_image: torch.Tensor  # [n_captions] int64
    image_ids: torch.Tensor  # [n_images] int64

    @property
    def caption_ids(self) -> torch.Tensor:
        return self.image_ids[self.caption_image]


@dataclass
class LabelFeatures:
    """Backbone features of a class-label split."""

    image: torch.Tensor  # [n, F_image]
    labels: torch.Tensor  # [n] int64


def _open(cfg: TrainConfig, split: str) -> Any:
    from metrank import data

    kwargs: dict[str, Any] = dict(root=cfg.data.root, split=split, **cfg.data.kwargs)
    if "download" in inspect.signature(data.DATASETS.get(cfg.data.dataset)).parameters:
        kwargs.setdefault("download", cfg.data.fetch)
    dataset = data.create_dataset(cfg.data.dataset, **kwargs)
    if cfg.task == "metric" and hasattr(dataset, "image_dataset"):
        dataset = dataset.image_dataset()  # image-text data used for class-label retrieval: labels = identities
    return dataset


def open_dataset(cfg: TrainConfig, split: str) -> Any:
    """``metrank.data.create_dataset`` for ``split``; datasets that can download themselves do so when missing and
    ``data.fetch`` is true (under ``torch.distributed`` rank 0 opens/fetches first while the other ranks wait).
    With ``task=metric``, an image-text dataset is used through its images and their identity labels."""
    dataset = _open(cfg, split) if distributed.rank() == 0 else None
    if distributed.is_distributed():
        torch.distributed.barrier()
    return dataset if dataset is not None else _open(cfg, split)


def subset_mask(labels: np.ndarray, max_classes: int | None, max_per_class: int | None) -> np.ndarray:
    """Boolean mask keeping the ``max_classes`` smallest labels and the first ``max_per_class`` items of each
    (None = no limit): a deterministic subset for small runs and tests."""
    keep = np.ones(len(labels), dtype=bool)
    if max_classes is not None:
        if max_classes < 1:
            raise InputError(f"data.max_classes must be >= 1 or null, got {max_classes}")
        keep &= np.isin(labels, np.unique(labels)[:max_classes])
    if max_per_class is not None:
        if max_per_class < 1:
            raise InputError(f"data.max_per_class must be >= 1 or null, got {max_per_class}")
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank_in_class = np.empty(len(labels), dtype=np.int64)
        rank_in_class[order] = np.arange(len(labels)) - starts
        keep &= rank_in_class < max_per_class
    return keep


def _load_image(dataset: Any, index: int) -> Image.Image:
    if hasattr(dataset, "load_image"):
        return dataset.load_image(index)
    with Image.open(dataset.images[index]) as im:
        return im.convert("RGB")


def _content_hash(values: Sequence[Any]) -> str:
    return hashlib.sha1(json.dumps([str(v) for v in values]).encode()).hexdigest()


def _image_keys(dataset: Any, indices: np.ndarray) -> list[Any]:
    if hasattr(dataset, "images"):
        return [dataset.images[i] for i in indices.tolist()]
    return [dataset.items[i][0] for i in indices.tolist()]


def cached_image_features(
    model: Any, dataset: Any, indices: np.ndarray, cfg: TrainConfig, split: str, device: torch.device
) -> torch.Tensor:
    """``model.image_features`` of images ``indices`` of ``dataset``, from the cache or computed once."""
    description = {
        "dataset": cfg.data.dataset,
        "root": cfg.data.root,
        "split": split,
        "kwargs": cfg.data.kwargs,
        "images": _content_hash(_image_keys(dataset, indices)),
    }
    key = feature_cache_key(image_fingerprint(model), description)

    def compute() -> dict[str, torch.Tensor]:
        return {
            "image": compute_image_features(
                model,
                lambda i: _load_image(dataset, int(indices[i])),
                len(indices),
                cfg.train.feature_batch_size,
                device,
                desc=f"{split} image features",
            )
        }

    return cached(cfg.output.cache_dir, f"{cfg.data.dataset}-{split}-images", key, compute)["image"]


def cached_text_features(
    model: Any, captions: list[str], cfg: TrainConfig, split: str, device: torch.device
) -> torch.Tensor:
    """``model.text_features`` of ``captions``, from the cache or computed once."""
    description = {"dataset": cfg.data.dataset, "split": split, "captions": _content_hash(captions)}
    key = feature_cache_key(text_fingerprint(model), description)

    def compute() -> dict[str, torch.Tensor]:
        return {
            "text": compute_text_features(
                model, captions, 4 * cfg.train.feature_batch_size, device, desc=f"{split} text features"
            )
        }

    return cached(cfg.output.cache_dir, f"{cfg.data.dataset}-{split}-texts", key, compute)["text"]


def pair_features(model: Any, dataset: Any, cfg: TrainConfig, split: str, device: torch.device) -> PairFeatures:
    """Backbone features of an ``ImageTextDataset`` split (restricted by ``data.max_classes``/``max_per_class``)."""
    image_ids = (
        np.asarray(dataset.image_labels, dtype=np.int64)
        if cfg.data.pair_ids == "labels"
        else np.arange(len(dataset.images), dtype=np.int64)
    )
    caption_image = np.asarray(dataset.caption_image, dtype=np.int64)
    keep_images = np.flatnonzero(subset_mask(image_ids, cfg.data.max_classes, cfg.data.max_per_class))
    new_index = np.full(len(image_ids), -1, dtype=np.int64)
    new_index[keep_images] = np.arange(len(keep_images))
    keep_captions = np.flatnonzero(new_index[caption_image] >= 0)
    if len(keep_captions) == 0:
        raise InputError(f"the {split!r} split of {cfg.data.dataset!r} has no captions for the selected images")
    captions = [dataset.captions[c] for c in keep_captions]
    return PairFeatures(
        image=cached_image_features(model, dataset, keep_images, cfg, split, device),
        text=cached_text_features(model, captions, cfg, split, device),
        caption_image=torch.from_numpy(new_index[caption_image[keep_captions]]),
        image_ids=torch.from_numpy(image_ids[keep_images]),
    )


def label_features(model: Any, dataset: Any, cfg: TrainConfig, split: str, device: torch.device) -> LabelFeatures:
    """Backbone features of an ``ImageLabelDataset`` split (restricted by ``data.max_classes``/``max_per_class``)."""
    labels = np.asarray(dataset.labels, dtype=np.int64)
    keep = np.flatnonzero(subset_mask(labels, cfg.data.max_classes, cfg.data.max_per_class))
    return LabelFeatures(
        image=cached_image_features(model, dataset, keep, cfg, split, device), labels=torch.from_numpy(labels[keep])
    )
