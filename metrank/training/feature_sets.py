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
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from metrank import data, distributed
from metrank.data.base import ImageTextDataset
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


def _open(cfg: TrainConfig, split: str, for_training: bool) -> Any:

    extra = cfg.data.train_kwargs if for_training else {}
    kwargs: dict[str, Any] = dict(root=cfg.data.root, split=split, **{**cfg.data.kwargs, **extra})
    if "download" in inspect.signature(data.DATASETS.get(cfg.data.dataset)).parameters:
        kwargs.setdefault("download", cfg.data.fetch)
    dataset = data.create_dataset(cfg.data.dataset, **kwargs)
    if cfg.task == "metric" and isinstance(dataset, ImageTextDataset):
        dataset = dataset.image_dataset()  # image-text data used for class-label retrieval: labels = identities
    return dataset


def open_dataset(cfg: TrainConfig, split: str, for_training: bool = False) -> Any:
    """``metrank.data.create_dataset`` for ``split`` (with ``data.train_kwargs`` too when ``for_training``: the
    rows that are trained on); datasets that can download themselves do so when missing and ``data.fetch`` is true
    (under ``torch.distributed`` rank 0 opens/fetches first while the other ranks wait). With ``task=metric``, an
    image-text dataset is used through its images and their identity labels."""
    dataset = _open(cfg, split, for_training) if distributed.rank() == 0 else None
    if distributed.is_distributed():
        torch.distributed.barrier()
    return dataset if dataset is not None else _open(cfg, split, for_training)


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


@dataclass
class Selection:
    """The rows of one split that training uses: ``image_index`` into the dataset's images, the identity of each
    (``image_ids``; class labels for ``task=metric``) and, for image-text data, the kept captions with the selected
    image each describes (``caption_image``, an index into ``image_index``)."""

    name: str  # "train", "val", "test": names the feature caches
    dataset: Any
    image_index: np.ndarray
    image_ids: np.ndarray
    captions: list[str] | None = None
    caption_image: np.ndarray | None = None

    @property
    def caption_ids(self) -> np.ndarray:
        return self.image_ids[self.caption_image]

    def image_keys(self) -> list[Any]:
        keys = self.dataset.images if isinstance(self.dataset, ImageTextDataset) else self.dataset.paths
        return [keys[i] for i in self.image_index.tolist()]

    def load_image(self, row: int) -> Image.Image:
        return self.dataset.load_image(int(self.image_index[row]))

    def subset(self, name: str, keep_ids: np.ndarray) -> Selection:
        """The rows whose identity is in ``keep_ids``."""
        images = np.flatnonzero(np.isin(self.image_ids, keep_ids))
        if self.captions is None or self.caption_image is None:
            return Selection(name, self.dataset, self.image_index[images], self.image_ids[images])
        new_index = np.full(len(self.image_index), -1, dtype=np.int64)
        new_index[images] = np.arange(len(images))
        captions = np.flatnonzero(new_index[self.caption_image] >= 0)
        return Selection(
            name,
            self.dataset,
            self.image_index[images],
            self.image_ids[images],
            [self.captions[c] for c in captions],
            new_index[self.caption_image[captions]],
        )


def select_rows(cfg: TrainConfig, dataset: Any, name: str) -> Selection:
    """The rows of ``dataset`` kept by ``data.max_classes``/``max_per_class`` (identities per ``data.pair_ids``)."""
    if isinstance(dataset, ImageTextDataset):
        image_ids = (
            np.asarray(dataset.image_labels, dtype=np.int64)
            if cfg.data.pair_ids == "labels"
            else np.arange(len(dataset.images), dtype=np.int64)
        )
    else:
        image_ids = np.asarray(dataset.labels, dtype=np.int64)
    keep = np.flatnonzero(subset_mask(image_ids, cfg.data.max_classes, cfg.data.max_per_class))
    if not isinstance(dataset, ImageTextDataset):
        return Selection(name, dataset, keep, image_ids[keep])
    new_index = np.full(len(image_ids), -1, dtype=np.int64)
    new_index[keep] = np.arange(len(keep))
    caption_image = np.asarray(dataset.caption_image, dtype=np.int64)
    captions = np.flatnonzero(new_index[caption_image] >= 0)
    if len(captions) == 0:
        raise InputError(f"the {name!r} split of {cfg.data.dataset!r} has no captions for the selected images")
    return Selection(
        name,
        dataset,
        keep,
        image_ids[keep],
        [dataset.captions[c] for c in captions],
        new_index[caption_image[captions]],
    )


def carve_validation(train: Selection, fraction: float, seed: int) -> tuple[Selection, Selection | None]:
    """Split the training rows by identity into (train, validation): a seeded ``fraction`` of the identities (at least
    one) becomes the validation split that picks the best model, so the test split is touched only at the end."""
    if fraction == 0.0:
        return train, None
    identities = np.unique(train.image_ids)
    n_val = max(1, int(round(fraction * len(identities))))
    if len(identities) - n_val < 2:
        raise InputError(
            f"data.val_fraction={fraction} leaves {len(identities) - n_val} training identities of "
            f"{len(identities)}; lower it, use more data, or set data.val_fraction=0"
        )
    val_ids = np.random.default_rng(seed).permutation(identities)[:n_val]
    return train.subset("train", np.setdiff1d(identities, val_ids)), train.subset("val", val_ids)


def _content_hash(values: Sequence[Any]) -> str:
    return hashlib.sha1(json.dumps([str(v) for v in values]).encode()).hexdigest()


def cached_image_features(model: Any, sel: Selection, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """``model.image_features`` of the selected images, from the cache or computed once."""
    description = {
        "dataset": cfg.data.dataset,
        "root": cfg.data.root,
        "split": sel.name,
        "kwargs": cfg.data.kwargs,
        "images": _content_hash(sel.image_keys()),
    }
    key = feature_cache_key(image_fingerprint(model), description)

    def compute() -> dict[str, torch.Tensor]:
        return {
            "image": compute_image_features(
                model,
                sel.load_image,
                len(sel.image_index),
                cfg.train.feature_batch_size,
                device,
                desc=f"{sel.name} image features",
            )
        }

    return cached(cfg.output.cache_dir, f"{cfg.data.dataset}-{sel.name}-images", key, compute)["image"]


def cached_text_features(model: Any, sel: Selection, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """``model.text_features`` of the selected captions, from the cache or computed once."""
    captions = sel.captions or []
    description = {"dataset": cfg.data.dataset, "split": sel.name, "captions": _content_hash(captions)}
    key = feature_cache_key(text_fingerprint(model), description)

    def compute() -> dict[str, torch.Tensor]:
        return {
            "text": compute_text_features(
                model, captions, 4 * cfg.train.feature_batch_size, device, desc=f"{sel.name} text features"
            )
        }

    return cached(cfg.output.cache_dir, f"{cfg.data.dataset}-{sel.name}-texts", key, compute)["text"]


def features(model: Any, sel: Selection, cfg: TrainConfig, device: torch.device) -> PairFeatures | LabelFeatures:
    """Frozen backbone features of a selection: :class:`PairFeatures` (image-text) or :class:`LabelFeatures`."""
    image = cached_image_features(model, sel, cfg, device)
    if sel.captions is None:
        return LabelFeatures(image=image, labels=torch.from_numpy(sel.image_ids))
    return PairFeatures(
        image=image,
        text=cached_text_features(model, sel, cfg, device),
        caption_image=torch.from_numpy(sel.caption_image),
        image_ids=torch.from_numpy(sel.image_ids),
    )


def pair_features(model: Any, dataset: Any, cfg: TrainConfig, split: str, device: torch.device) -> PairFeatures:
    """Backbone features of an ``ImageTextDataset`` split (restricted by ``data.max_classes``/``max_per_class``)."""
    return cast(PairFeatures, features(model, select_rows(cfg, dataset, split), cfg, device))


def label_features(model: Any, dataset: Any, cfg: TrainConfig, split: str, device: torch.device) -> LabelFeatures:
    """Backbone features of an ``ImageLabelDataset`` split (restricted by ``data.max_classes``/``max_per_class``)."""
    return cast(LabelFeatures, features(model, select_rows(cfg, dataset, split), cfg, device))
