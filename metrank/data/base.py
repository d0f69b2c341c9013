"""The two dataset types every loader returns.

``ImageLabelDataset``: items ``(path_or_key, label)``, ``__getitem__ -> (image, label)``; for class-label retrieval.
``ImageTextDataset``: images with identity/class labels and captions pointing at them; ``__getitem__`` iterates
caption pairs ``(image, caption, image_label)``, ``image_dataset()`` gives the images as an ``ImageLabelDataset``.

Unreadable images. ``on_error="raise"`` (default): ``__getitem__`` raises ``ImageLoadError`` naming the file.
``on_error="skip"``: ``__getitem__`` never raises for a bad file; it warns once with the path, records it in
``bad_paths`` (per process: DataLoader workers keep their own), and returns the next readable item with the same
label (or the next readable item at all), so a training run never dies mid-epoch. ``scan()`` checks every image
up front and returns ``[(path, reason)]``; ``scan(remove=True)`` also drops them from the dataset.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from metrank.errors import InputError, MissingFileError
from metrank.images import ImageLoadError, open_rgb
from metrank.registry import Registry

ON_ERROR = ("raise", "skip")
Loader = Callable[[Any], Image.Image]


DATASETS: Registry = Registry("dataset")  # name -> loader(root=None, split="train", **kw); see metrank.data


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def remap_labels(raw: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Contiguous ``int64`` labels ``0..C-1`` (in sorted order of the raw labels) and the raw label of each."""
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[c] for c in raw], dtype=np.int64), classes


class ImageLabelDataset(Dataset):
    """Images with integer class labels.

    Args:
        items: ``(path_or_key, label)`` pairs; labels are integers (contiguous after ``remap_labels``).
        transform: applied to the RGB PIL image (e.g. ``model.image_transform``); ``None`` returns PIL images.
        loader: turns an item's key into an RGB PIL image; default opens the path (``open_rgb``).
        on_error: ``"raise"`` or ``"skip"`` (see module docstring).
        class_names: name of each label value, for display.
        views: optional view/domain of each item (e.g. the emoji vendor, In-Shop query/gallery).

    ``mirror_invariant``: whether a horizontally flipped image keeps its label (training may then flip); False
    unless a dataset declares it (emoji and icons: an arrow flipped is another arrow).
    """

    mirror_invariant = False
    super_labels: np.ndarray | None = None  # coarse classes where a dataset has them (SOP super-categories)

    def __init__(
        self,
        items: Sequence[tuple[Any, int]],
        transform: Callable | None = None,
        loader: Loader | None = None,
        on_error: str = "raise",
        class_names: Sequence[str] | None = None,
        name: str = "images",
        views: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        self.items = [(key, int(label)) for key, label in items]
        if views is not None and len(views) != len(self.items):
            raise InputError(f"{len(views)} views for {len(self.items)} items")
        self.views = np.asarray(views, dtype=object) if views is not None else None
        self.labels = np.asarray([label for _, label in self.items], dtype=np.int64)
        self.transform = transform
        self.loader = loader or open_rgb
        self.on_error = check_on_error(on_error)
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name
        self.bad_paths: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {len(self)} images, "
            f"{len(np.unique(self.labels))} classes, on_error={self.on_error!r})"
        )

    @property
    def paths(self) -> list[Any]:
        return [key for key, _ in self.items]

    def load_image(self, i: int) -> Image.Image:
        """RGB PIL image of item ``i``; raises ``ImageLoadError`` if it cannot be read."""
        key = self.items[i][0]
        try:
            return self.loader(key)
        except ImageLoadError:
            raise
        except Exception as err:  # a custom loader failing in its own way
            raise ImageLoadError(str(key), f"{type(err).__name__}: {err}") from None

    def _load_or_substitute(self, i: int) -> tuple[Image.Image, int]:
        """Image of item ``i``; under ``on_error="skip"`` a bad item is replaced (see module docstring)."""
        try:
            return self.load_image(i), i
        except ImageLoadError as err:
            if self.on_error == "raise":
                raise
            self._record_bad(err)
        n = len(self)
        same_label = [j for j in range(i + 1, i + n) if self.labels[j % n] == self.labels[i]]
        others = [j for j in range(i + 1, i + n) if self.labels[j % n] != self.labels[i]]
        for j in same_label + others:
            j %= n
            if str(self.items[j][0]) in self.bad_paths:
                continue
            try:
                return self.load_image(j), j
            except ImageLoadError as err:
                self._record_bad(err)
        raise ImageLoadError(str(self.items[i][0]), f"no readable image left in dataset {self.name!r}")

    def _record_bad(self, err: ImageLoadError) -> None:
        if err.path not in self.bad_paths:
            self.bad_paths[err.path] = err.reason
            warnings.warn(f"skipping unreadable image {err.path!r}: {err.reason}", RuntimeWarning, stacklevel=3)

    def __getitem__(self, i: int):
        image, j = self._load_or_substitute(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[j])

    def scan(self, remove: bool = False, progress: bool = True) -> list[tuple[str, str]]:
        """Try to read every image; return ``[(path, reason)]`` of the bad ones (and drop them if ``remove``)."""
        bad: list[tuple[str, str]] = []
        keep: list[int] = []
        for i in tqdm(range(len(self)), desc=f"scan {self.name}", disable=not progress, unit="img"):
            try:
                self.load_image(i)
                keep.append(i)
            except ImageLoadError as err:
                bad.append((err.path, err.reason))
        if remove and bad:
            self._keep(keep)
        return bad

    def _keep(self, indices: Sequence[int]) -> None:
        self.items = [self.items[i] for i in indices]
        self.labels = self.labels[np.asarray(indices, dtype=np.int64)]
        if self.views is not None:
            self.views = self.views[np.asarray(indices, dtype=np.int64)]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageLabelDataset:
        """A new dataset with items ``indices`` (same transform, loader, error policy, label values)."""
        views = None if self.views is None else self.views[np.asarray(indices, dtype=np.int64)]
        return ImageLabelDataset(
            [self.items[i] for i in indices],
            self.transform,
            self.loader,
            self.on_error,
            self.class_names,
            self.name,
            views,
        )

    def select_view(self, view: str) -> ImageLabelDataset:
        """Items of one view (e.g. ``"twitter"``)."""
        return self.subset(np.flatnonzero(_view_mask(self.views, view)))


class ImageTextDataset(Dataset):
    """Images with identity/class labels, and captions each describing one image.

    Attributes:
        images: image paths (or loader keys).
        image_labels: ``int64 [n_images]`` identity/class of each image (two images of one identity share it).
        captions: ``list[str]``.
        caption_image: ``int64 [n_captions]`` index into ``images`` of each caption's image.
        image_views: optional view/domain of each image (emoji: the vendor).
    ``__getitem__(i) -> (image, caption, image_label)`` for caption ``i``: the label is the id that masks false
    negatives in cross-modal losses (captions of the same image or identity).

    Empty captions raise ``ValueError`` naming them, or with ``empty_captions="skip"`` are dropped and listed in
    ``skipped_captions`` (with a warning). ``mirror_invariant`` as for :class:`ImageLabelDataset`.
    """

    mirror_invariant = False
    categories: list[str] | None = None  # per image, where a dataset has them (emoji category, subcategory)
    subcategories: list[str] | None = None

    def __init__(
        self,
        images: Sequence[Any],
        image_labels: Sequence[int] | np.ndarray,
        captions: Sequence[str],
        caption_image: Sequence[int] | np.ndarray,
        transform: Callable | None = None,
        loader: Loader | None = None,
        on_error: str = "raise",
        empty_captions: str = "raise",
        class_names: Sequence[str] | None = None,
        name: str = "image-text",
        image_views: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        if empty_captions not in ("raise", "skip"):
            raise InputError(f"empty_captions must be 'raise' or 'skip', got {empty_captions!r}")
        caption_index = np.asarray(caption_image, dtype=np.int64)
        if len(captions) != len(caption_index):
            raise InputError(f"{len(captions)} captions but {len(caption_index)} caption_image entries")
        if len(images) != len(image_labels):
            raise InputError(f"{len(images)} images but {len(image_labels)} image labels")
        if len(caption_index) and (caption_index.min() < 0 or caption_index.max() >= len(images)):
            raise InputError(f"caption_image must index into the {len(images)} images")
        empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
        if empty:
            where = [f"caption {i} of image {images[caption_index[i]]!r}" for i in empty[:5]]
            if empty_captions == "raise":
                raise InputError(
                    f"dataset {name!r} has {len(empty)} empty captions ({'; '.join(where)}"
                    f"{' ...' if len(empty) > 5 else ''}); fix them or pass empty_captions='skip'"
                )
            warnings.warn(
                f"dataset {name!r}: skipping {len(empty)} empty captions ({'; '.join(where)})",
                RuntimeWarning,
                stacklevel=2,
            )
        keep = np.setdiff1d(np.arange(len(captions)), np.asarray(empty, dtype=np.int64))
        self.skipped_captions = [(str(images[caption_index[i]]), i) for i in empty]
        self.images = list(images)
        self.image_labels = np.asarray(image_labels, dtype=np.int64)
        self.captions = [captions[i].strip() for i in keep]
        self.caption_image = caption_index[keep]
        self.transform = transform
        self.loader = loader or open_rgb
        self.on_error = check_on_error(on_error)
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name
        self.image_views = np.asarray(image_views, dtype=object) if image_views is not None else None
        self._image_dataset = ImageLabelDataset(
            list(zip(self.images, self.image_labels)), transform, self.loader, on_error, class_names, name, image_views
        )

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {len(self.images)} images, {len(self.captions)} captions, "
            f"{len(np.unique(self.image_labels))} identities)"
        )

    @property
    def caption_labels(self) -> np.ndarray:
        """Identity/class label of each caption (its image's label)."""
        return self.image_labels[self.caption_image]

    @property
    def bad_paths(self) -> dict[str, str]:
        return self._image_dataset.bad_paths

    def image_dataset(self) -> ImageLabelDataset:
        """The images as an ``ImageLabelDataset`` (labels = ``image_labels``), sharing transform and error policy."""
        self._image_dataset.transform = self.transform
        return self._image_dataset

    def load_image(self, i: int) -> Image.Image:
        """RGB PIL image ``i`` (an index into ``images``)."""
        return self._image_dataset.load_image(i)

    def __getitem__(self, i: int):
        images = self.image_dataset()
        image, _ = images[int(self.caption_image[i])]
        return image, self.captions[i], int(self.image_labels[self.caption_image[i]])

    def scan(self, progress: bool = True) -> list[tuple[str, str]]:
        """``[(path, reason)]`` of images that cannot be read (drop them with ``select_images``)."""
        return self._image_dataset.scan(progress=progress)

    def select_images(self, indices: Sequence[int] | np.ndarray) -> ImageTextDataset:
        """A new dataset with images ``indices`` (in that order) and their captions."""
        rows = np.asarray(indices, dtype=np.int64)
        new_index = np.full(len(self.images), -1, dtype=np.int64)
        new_index[rows] = np.arange(len(rows))
        keep = np.flatnonzero(new_index[self.caption_image] >= 0)
        views = None if self.image_views is None else self.image_views[rows]
        return ImageTextDataset(
            [self.images[i] for i in rows],
            self.image_labels[rows],
            [self.captions[i] for i in keep],
            new_index[self.caption_image[keep]],
            self.transform,
            self.loader,
            self.on_error,
            "raise",
            self.class_names,
            self.name,
            views,
        )

    def select_view(self, view: str) -> ImageTextDataset:
        """Images of one view (e.g. ``"twitter"``) and their captions."""
        return self.select_images(np.flatnonzero(_view_mask(self.image_views, view)))


def _view_mask(views: np.ndarray | None, view: str) -> np.ndarray:
    if views is None:
        raise InputError("this dataset has no views")
    mask = views == view
    if not mask.any():
        raise InputError(f"no items with view {view!r}; views: {', '.join(sorted(set(views)))}")
    return mask


def find_existing(root: str, candidates: Sequence[str], what: str) -> str:
    """First of ``root/candidate`` that exists, else ``FileNotFoundError`` listing what was tried."""
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.exists(path):
            return path
    raise MissingFileError(f"{what} not found; looked for {', '.join(os.path.join(root, c) for c in candidates)}")
