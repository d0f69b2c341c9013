"""The four standard deep-metric-learning benchmarks, read from their published layouts, with the standard
class-disjoint splits (labels are made contiguous within each split; ``class_names`` keeps the original ids):

* CUB-200-2011 (``<root>/CUB_200_2011/`` or ``<root>/``): ``images.txt`` (``id path``), ``image_class_labels.txt``
  (``id class``), ``images/<path>``. Train classes 1-100 (5,864 images), test 101-200 (5,924).
* Cars196 (``<root>/``): ``cars_annos.mat`` (struct ``annotations`` with ``relative_im_path``, ``class``; read with
  scipy) or, without scipy, ``cars_annos.csv`` with columns ``relative_im_path,class`` (export of the same table);
  images ``car_ims/*.jpg`` relative to ``<root>``. Train classes 1-98 (8,054), test 99-196 (8,131).
* Stanford Online Products (``<root>/Stanford_Online_Products/`` or ``<root>/``): ``Ebay_train.txt`` /
  ``Ebay_test.txt`` (header ``image_id class_id super_class_id path``). 11,318 train / 11,316 test classes;
  ``super_labels`` holds the super-class (0-based) of each item.
* In-Shop Clothes (``<root>/``): ``list_eval_partition.txt`` (count line, header line, then
  ``image_name item_id evaluation_status``), images ``img/...`` relative to ``<root>``. Splits ``train``
  (3,997 items), ``query`` (14,218) and ``gallery`` (12,612); query and gallery share one label mapping.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrank.data.base import DATASETS, ImageLabelDataset, find_existing, remap_labels
from metrank.data.root import require_root
from metrank.data.splits import check_split
from metrank.errors import InputError


def _read_rows(path: str, skip: int = 0) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        rows = [line.split() for line in f.read().splitlines()[skip:]]
    return [row for row in rows if row]


def _labelled(name: str, split: str, paths: Sequence[str], raw_labels: Sequence[Any], **kw) -> ImageLabelDataset:
    labels, classes = remap_labels(raw_labels)
    return ImageLabelDataset(
        list(zip(paths, labels)), class_names=[str(c) for c in classes], name=f"{name}-{split}", **kw
    )


@DATASETS.register("cub")
def load_cub(root: str | None = None, split: str = "train", **kw) -> ImageLabelDataset:
    """CUB-200-2011; see module docstring."""
    check_split(split)
    root = require_root("cub", root)
    base = os.path.dirname(find_existing(root, ["CUB_200_2011/images.txt", "images.txt"], "CUB-200-2011 images.txt"))
    paths = {i: p for i, p in _read_rows(os.path.join(base, "images.txt"))}
    classes = {i: int(c) for i, c in _read_rows(os.path.join(base, "image_class_labels.txt"))}
    chosen = [
        (os.path.join(base, "images", paths[i]), classes[i])
        for i in sorted(paths, key=int)
        if split == "all" or (classes[i] <= 100) == (split == "train")
    ]
    return _labelled("cub", split, [p for p, _ in chosen], [c for _, c in chosen], **kw)


def _cars_annotations(root: str) -> list[tuple[str, int]]:
    mat = os.path.join(root, "cars_annos.mat")
    if os.path.exists(mat):
        try:
            from scipy.io import loadmat
        except ImportError:
            raise InputError(
                "reading cars_annos.mat needs scipy (pip install scipy), or provide cars_annos.csv "
                "with columns relative_im_path,class"
            ) from None
        annotations = loadmat(mat)["annotations"][0]
        return [(str(a["relative_im_path"][0]), int(a["class"][0][0])) for a in annotations]
    table = find_existing(root, ["cars_annos.csv"], "Cars196 cars_annos.mat / cars_annos.csv")
    with open(table, newline="", encoding="utf-8") as f:
        return [(row["relative_im_path"], int(row["class"])) for row in csv.DictReader(f)]


@DATASETS.register("cars196")
def load_cars196(root: str | None = None, split: str = "train", **kw) -> ImageLabelDataset:
    """Cars196; see module docstring."""
    check_split(split)
    root = require_root("cars196", root)
    chosen = [
        (os.path.join(root, p), c)
        for p, c in _cars_annotations(root)
        if split == "all" or (c <= 98) == (split == "train")
    ]
    return _labelled("cars196", split, [p for p, _ in chosen], [c for _, c in chosen], **kw)


@DATASETS.register("sop")
def load_sop(root: str | None = None, split: str = "train", **kw) -> ImageLabelDataset:
    """Stanford Online Products; see module docstring."""
    check_split(split)
    root = require_root("sop", root)
    base = os.path.dirname(
        find_existing(
            root,
            ["Stanford_Online_Products/Ebay_train.txt", "Ebay_train.txt"],
            "Stanford Online Products Ebay_train.txt",
        )
    )
    files = {"train": ["Ebay_train.txt"], "test": ["Ebay_test.txt"], "all": ["Ebay_train.txt", "Ebay_test.txt"]}
    rows = [row for file in files[split] for row in _read_rows(os.path.join(base, file), skip=1)]
    dataset = _labelled("sop", split, [os.path.join(base, r[3]) for r in rows], [int(r[1]) for r in rows], **kw)
    dataset.super_labels = np.asarray([int(r[2]) - 1 for r in rows], dtype=np.int64)
    return dataset


@DATASETS.register("inshop")
def load_inshop(root: str | None = None, split: str = "train", **kw) -> ImageLabelDataset:
    """In-Shop Clothes Retrieval; ``split`` is train, query or gallery (see module docstring)."""
    check_split(split, ("train", "query", "gallery"))
    root = require_root("inshop", root)
    table = find_existing(
        root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt"], "In-Shop list_eval_partition.txt"
    )
    rows = _read_rows(table, skip=2)
    test_items = sorted({item for _, item, status in rows if status != "train"})
    test_index: dict[str, int] = {item: i for i, item in enumerate(test_items)}
    chosen = [(os.path.join(root, path), item) for path, item, status in rows if status == split]
    if split == "train":
        return _labelled("inshop", split, [p for p, _ in chosen], [item for _, item in chosen], **kw)
    return ImageLabelDataset(
        [(p, test_index[item]) for p, item in chosen], class_names=test_items, name=f"inshop-{split}", **kw
    )
