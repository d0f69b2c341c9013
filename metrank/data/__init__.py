"""Datasets: ``create_dataset(name, root=None, split="train", **kw)`` and the ``DATASETS`` registry.

Class-label sets return an ``ImageLabelDataset``; caption sets an ``ImageTextDataset`` (see ``metrank.data.base``).
``root`` defaults to ``$METRANK_DATA`` (``~/.cache/metrank``) for the offline sets ("emoji", "tuxpaint",
"fashion_mnist"); the standard sets take the directory holding their usual layout (``metrank data fetch NAME``
prints where to get each and how to lay it out).
"""

from __future__ import annotations

from typing import Any

# each loader module registers its data sets in DATASETS when imported
from metrank.data import caption_sets, emoji, fashion_mnist, folder, metric_sets, tuxpaint  # noqa: F401
from metrank.data.base import DATASETS, ImageLabelDataset, ImageTextDataset
from metrank.data.emoji import fetch_emoji
from metrank.data.fetch import fetch_dataset
from metrank.data.root import data_root
from metrank.images import ImageLoadError, open_rgb, to_rgb


def create_dataset(
    name: str, root: str | None = None, split: str = "train", **kwargs: Any
) -> ImageLabelDataset | ImageTextDataset:
    """Load dataset ``name`` (see ``DATASETS.names()``) from ``root`` for ``split`` ("train", "test", "all"; some
    sets have more, e.g. In-Shop "query"/"gallery", Karpathy "val"). Extra keyword arguments go to the loader
    (``transform``, ``on_error="skip"``, ...)."""
    return DATASETS.get(name)(root=root, split=split, **kwargs)


__all__ = [
    "DATASETS",
    "create_dataset",
    "ImageLabelDataset",
    "ImageTextDataset",
    "ImageLoadError",
    "open_rgb",
    "to_rgb",
    "data_root",
    "fetch_emoji",
    "fetch_dataset",
]
