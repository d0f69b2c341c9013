"""Datasets: ``create_dataset(name, root=None, split="train", **kw)`` and the ``DATASETS`` registry.

Class-label sets return an ``ImageLabelDataset``; caption sets an ``ImageTextDataset`` (see ``metrank.data.base``).
``root`` defaults to ``$METRANK_DATA`` (``~/.cache/metrank``) for the offline sets ("emoji", "tuxpaint",
"fashion_mnist"); the standard sets take the directory holding their usual layout (``metrank data fetch NAME``
prints where to get each and how to lay it out).
"""

from __future__ import annotations

from typing import Any

from metrank.data.base import ImageLabelDataset, ImageTextDataset
from metrank.data.caption_sets import load_caption_table, load_coco, load_flickr30k
from metrank.data.emoji import fetch_emoji, load_emoji
from metrank.data.fashion_mnist import load_fashion_mnist
from metrank.data.fetch import fetch_dataset
from metrank.data.folder import load_image_folder
from metrank.data.metric_sets import load_cars196, load_cub, load_inshop, load_sop
from metrank.data.root import data_root
from metrank.data.tuxpaint import load_tuxpaint
from metrank.images import ImageLoadError, open_rgb, to_rgb
from metrank.registry import Registry

DATASETS: Registry = Registry("dataset")
_LOADERS: list[tuple[str, Any]] = [
    ("emoji", load_emoji),
    ("tuxpaint", load_tuxpaint),
    ("fashion_mnist", load_fashion_mnist),
    ("cub", load_cub),
    ("cars196", load_cars196),
    ("sop", load_sop),
    ("inshop", load_inshop),
    ("flickr30k", load_flickr30k),
    ("coco", load_coco),
    ("image_folder", load_image_folder),
    ("csv", load_caption_table),
]
for _name, _loader in _LOADERS:
    DATASETS.register(_name)(_loader)


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
