"""A folder per class (``<root>/<class>/**/<image>``), torchvision ``ImageFolder`` style. ``split="all"`` keeps every
class; ``train``/``test`` split the classes (seeded, ``test_fraction`` held out) so test classes are unseen."""

from __future__ import annotations

import os

from metrank.data.base import DATASETS, ImageLabelDataset, remap_labels
from metrank.data.splits import check_split, held_out_classes, in_split
from metrank.errors import InputError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@DATASETS.register("image_folder")
def load_image_folder(
    root: str | None = None,
    split: str = "all",
    test_fraction: float = 0.5,
    seed: int = 0,
    extensions=IMAGE_EXTENSIONS,
    **kw,
) -> ImageLabelDataset:
    """Images under ``<root>/<class>/`` labelled by their class folder; see module docstring."""
    check_split(split)
    if root is None or not os.path.isdir(root):
        raise MissingFileError(f"image_folder needs root=<directory with one sub-folder per class>, got {root!r}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise InputError(f"{root!r} has no class sub-folders")
    test = held_out_classes(classes, test_fraction, seed) if split != "all" else set()
    paths, raw = [], []
    for cls in classes:
        if not in_split(cls in test, split):
            continue
        for directory, _, files in sorted(os.walk(os.path.join(root, cls))):
            for file in sorted(files):
                if file.lower().endswith(tuple(extensions)):
                    paths.append(os.path.join(directory, file))
                    raw.append(cls)
    if not paths:
        raise InputError(f"no images with extensions {extensions} under {root!r} for split {split!r}")
    labels, names = remap_labels(raw)
    return ImageLabelDataset(
        list(zip(paths, labels)), class_names=names, name=f"{os.path.basename(os.path.normpath(root))}-{split}", **kw
    )
