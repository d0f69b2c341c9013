"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``): real photo cut-outs and drawings with human-written
captions, in category folders.

Each stamp is an image ``<dir>/<stem>.png`` or ``<dir>/<stem>.svg`` next to ``<dir>/<stem>.txt``, whose first line
is the English caption (the other lines are translations). Stamps with both a PNG and an SVG use the PNG; SVG-only
stamps are rendered with cairosvg (``pip install cairosvg``; without it they are left out with a warning).
``image_labels`` is the category folder (e.g. ``animals/birds``, 125 folders), ``class_names`` the folder names.
Split: a seeded random ``test_fraction`` of the stamps is held out (``split_by="stamp"``, for caption retrieval)
or of the category folders (``split_by="category"``, class-disjoint category retrieval).
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image

from metrank.data.base import DATASETS, ImageTextDataset, remap_labels
from metrank.data.splits import check_split, held_out_classes, in_split
from metrank.errors import InputError, MissingFileError
from metrank.images import ImageLoadError, open_rgb, to_rgb

TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
SVG_SIZE = 256


def cairosvg_available() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class StampLoader:
    """Open a stamp image: PNG directly, SVG rendered with cairosvg at ``SVG_SIZE`` px (picklable)."""

    def __call__(self, path: str) -> Image.Image:
        if not path.endswith(".svg"):
            return open_rgb(path)
        import cairosvg

        try:
            png = cairosvg.svg2png(url=path, output_width=SVG_SIZE, unsafe=True)
            with Image.open(io.BytesIO(png)) as image:
                image.load()
                return to_rgb(image)
        except Exception as err:
            raise ImageLoadError(path, f"SVG render failed: {type(err).__name__}: {err}") from None


def read_caption(path: str) -> str:
    """First line of a stamp's ``.txt`` file, stripped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


@DATASETS.register("tuxpaint")
def load_tuxpaint(
    root: str | None = None,
    split: str = "train",
    split_by: str = "stamp",
    test_fraction: float = 0.3,
    seed: int = 0,
    **kw,
) -> ImageTextDataset:
    """Tux Paint stamps as an ``ImageTextDataset`` (one caption per image); see module docstring."""
    check_split(split)
    if split_by not in ("stamp", "category"):
        raise InputError(f"split_by must be 'stamp' or 'category', got {split_by!r}")
    root = root or TUXPAINT_DIR
    if not os.path.isdir(root):
        raise MissingFileError(f"Tux Paint stamps not found at {root!r}; `metrank data fetch tuxpaint`")
    render_svg = cairosvg_available()
    stamps, skipped_svg = [], 0
    for directory, _, files in sorted(os.walk(root)):
        for file in sorted(files):
            if not file.endswith(".txt"):
                continue
            stem = os.path.join(directory, file[:-4])
            image = stem + ".png" if os.path.exists(stem + ".png") else stem + ".svg"
            if not os.path.exists(image):
                continue
            if image.endswith(".svg") and not render_svg:
                skipped_svg += 1
                continue
            stamps.append((image, os.path.relpath(directory, root), read_caption(stem + ".txt")))
    if skipped_svg:
        warnings.warn(
            f"tuxpaint: {skipped_svg} SVG-only stamps left out (pip install cairosvg to render them)",
            RuntimeWarning,
            stacklevel=2,
        )
    keys = [s[0] if split_by == "stamp" else s[1] for s in stamps]
    test = held_out_classes(keys, test_fraction, seed) if split != "all" else set()
    chosen = [s for s, key in zip(stamps, keys) if in_split(key in test, split)]
    labels, categories = remap_labels([category for _, category, _ in chosen])
    return ImageTextDataset(
        [s[0] for s in chosen],
        labels,
        [s[2] for s in chosen],
        range(len(chosen)),
        loader=StampLoader(),
        class_names=categories,
        name=f"tuxpaint-{split}",
        **kw,
    )
