"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``): 70,000 28x28 grey images,
10 classes. ``split`` train/test are the official 60k/10k files (same classes); ``class_disjoint=True`` instead
uses all 70k with classes 0-4 for train and 5-9 for test (metric-learning style). Labels are contiguous within the split (``class_names`` names them). Items are ``(index, label)``;
images come from memory as RGB PIL images."""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np
from PIL import Image

from metrank.data.base import DATASETS, ImageLabelDataset, remap_labels
from metrank.data.splits import check_split
from metrank.errors import InputError, MissingFileError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def read_idx(path: str) -> np.ndarray:
    """Array stored in an (optionally gzipped) IDX file (LeCun's MNIST format: magic, dims, big-endian data)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InputError(f"{path!r} is not an IDX file")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise InputError(f"{path!r}: header says {shape} but holds {array.size} values (truncated?)")
    return array.reshape(shape)


class ArrayImageLoader:
    """Loader for items keyed by index into a ``[N, H, W]`` uint8 array (picklable for DataLoader workers)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index], mode="L").convert("RGB")


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(
    root: str | None = None, split: str = "train", class_disjoint: bool = False, **kw
) -> ImageLabelDataset:
    """Fashion-MNIST; see module docstring. ``root`` defaults to the Debian package directory."""
    check_split(split)
    root = root or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise MissingFileError(f"Fashion-MNIST not found at {root!r}; `metrank data fetch fashion_mnist`")
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}["all" if class_disjoint else split]
    pixels = np.concatenate([read_idx(os.path.join(root, f"{p}-images-idx3-ubyte.gz")) for p in parts])
    labels = np.concatenate([read_idx(os.path.join(root, f"{p}-labels-idx1-ubyte.gz")) for p in parts])
    labels = labels.astype(np.int64)
    keep = np.arange(len(labels))
    if class_disjoint and split != "all":
        keep = np.flatnonzero((labels < 5) == (split == "train"))
    split_labels, classes = remap_labels(labels[keep].tolist())
    dataset = ImageLabelDataset(
        list(zip(keep.tolist(), split_labels.tolist())),
        loader=ArrayImageLoader(pixels),
        class_names=[FASHION_MNIST_CLASSES[c] for c in classes],
        name=f"fashion_mnist-{split}",
        **kw,
    )
    dataset.mirror_invariant = True  # a mirrored shirt is still a shirt
    return dataset
