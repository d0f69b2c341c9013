"""Image-caption sets: Flickr30K / MS-COCO with Karpathy's splits, and any CSV / JSON-lines table of image paths
and captions.

Karpathy layout (``<root>/``): ``dataset_flickr30k.json`` or ``dataset_coco.json`` (``images[]`` with ``filename``,
optional ``filepath``, ``split`` in train/val/test/restval, ``sentences[].raw``) and the images under
``<root>/<image_dir>/[<filepath>/]<filename>`` (``image_dir`` default: ``flickr30k-images`` for Flickr30K, the root
itself for COCO, whose ``filepath`` is ``train2014``/``val2014``). ``split="train"`` includes ``restval`` unless
``restval=False`` (the usual 113,287-image COCO training set). Flickr30K test: 1,000 images / 5,000 captions;
COCO test: 5,000 / 25,000 (1K folds are the five consecutive 1,000-image blocks of the test images).

Tables (``csv``): a CSV (header row) or ``.jsonl`` file with an image column and a caption column (names
configurable), optional ``label`` column (identity/class; default: one label per distinct image) and optional
``split`` column (rows whose split differs from the requested one are dropped; without it, every row is in every
split). Image paths are relative to the table's directory. Several rows may name the same image.
"""

from __future__ import annotations

import csv
import json
import os

from metrank.data.base import DATASETS, ImageTextDataset, find_existing
from metrank.data.root import require_root
from metrank.data.splits import check_split
from metrank.errors import InputError, MissingFileError

KARPATHY_SPLITS = ("train", "val", "test", "restval", "all")


def load_karpathy(
    name: str,
    root: str | None = None,
    split: str = "train",
    image_dir: str | None = None,
    restval: bool = True,
    **kw,
) -> ImageTextDataset:
    """Flickr30K (``name="flickr30k"``) or COCO (``"coco"``) with Karpathy's split; see module docstring."""
    check_split(split, KARPATHY_SPLITS)
    root = require_root(name, root)
    table = find_existing(root, [f"dataset_{name}.json"], f"Karpathy split file dataset_{name}.json")
    with open(table, encoding="utf-8") as f:
        entries = json.load(f)["images"]
    wanted = {
        "train": {"train", "restval"} if restval else {"train"},
        "val": {"val"},
        "test": {"test"},
        "restval": {"restval"},
        "all": {"train", "val", "test", "restval"},
    }[split]
    image_dir = os.path.join(
        root, image_dir if image_dir is not None else ("flickr30k-images" if name == "flickr30k" else "")
    )
    images: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for entry in entries:
        if entry["split"] not in wanted:
            continue
        caption_image.extend([len(images)] * len(entry["sentences"]))
        captions.extend(s["raw"] for s in entry["sentences"])
        images.append(os.path.join(image_dir, entry.get("filepath", ""), entry["filename"]))
    return ImageTextDataset(images, range(len(images)), captions, caption_image, name=f"{name}-{split}", **kw)


@DATASETS.register("flickr30k")
def load_flickr30k(root: str | None = None, split: str = "train", **kw) -> ImageTextDataset:
    return load_karpathy("flickr30k", root, split, **kw)


@DATASETS.register("coco")
def load_coco(root: str | None = None, split: str = "train", **kw) -> ImageTextDataset:
    return load_karpathy("coco", root, split, **kw)


def _read_table(path: str) -> list[dict[str, str]]:
    if path.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@DATASETS.register("csv")
def load_caption_table(
    root: str | None = None,
    split: str = "all",
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str = "label",
    split_column: str = "split",
    **kw,
) -> ImageTextDataset:
    """Image-caption table (``root`` = the ``.csv`` / ``.jsonl`` file); see module docstring."""
    if root is None or not os.path.isfile(root):
        raise MissingFileError(f"csv dataset needs root=<path to a .csv or .jsonl file>, got {root!r}")
    rows = _read_table(root)
    if not rows:
        raise InputError(f"{root!r} has no rows")
    for column in (image_column, caption_column):
        if column not in rows[0]:
            raise InputError(f"{root!r} has no column {column!r}; columns: {', '.join(rows[0])}")
    base = os.path.dirname(os.path.abspath(root))
    has_split = split_column in rows[0]
    if has_split:
        check_split(split, sorted({str(r[split_column]) for r in rows} | {"all"}))
    rows = [r for r in rows if split == "all" or not has_split or str(r[split_column]) == split]
    image_index: dict[str, int] = {}
    raw_labels: list[str] = []
    captions, caption_image = [], []
    for r in rows:
        path = os.path.join(base, str(r[image_column]))
        if path not in image_index:
            image_index[path] = len(image_index)
            raw_labels.append(str(r[label_column]) if label_column in r else path)
        captions.append(r[caption_column] if r[caption_column] is not None else "")
        caption_image.append(image_index[path])
    label_ids = {label: i for i, label in enumerate(dict.fromkeys(raw_labels))}
    return ImageTextDataset(
        list(image_index),
        [label_ids[x] for x in raw_labels],
        captions,
        caption_image,
        name=f"{os.path.basename(root)}-{split}",
        **kw,
    )
