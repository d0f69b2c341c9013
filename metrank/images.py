"""Opening images: any PIL mode -> RGB with transparency composited on white; unreadable files raise
``ImageLoadError`` naming the path."""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from metrank.errors import InputError


class ImageLoadError(InputError):
    """An image file is missing, truncated or not an image; ``path`` says which."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot load image {path!r}: {reason}")
        self.path = path
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB (returned as is if already RGB); transparent pixels (RGBA, LA, palette with transparency) become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Load ``path`` fully as an RGB image, or raise ``ImageLoadError`` with the path and the reason."""
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(path, f"{type(err).__name__}: {err}") from None
