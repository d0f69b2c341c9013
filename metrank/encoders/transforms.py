"""Image transforms shared by every encoder: RGB conversion (transparency composited on white), resize, crop,
normalisation; the training variant adds a random resized crop and a colour jitter (brightness, contrast,
saturation; no hue shift: a red heart and a blue heart are different emoji). A horizontal flip is not part of it:
only the trainer adds one, for datasets that declare ``mirror_invariant`` (an arrow flipped is another arrow)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from metrank.errors import InputError
from metrank.images import to_rgb

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class ToRGB:
    """PIL image of any mode -> RGB; transparent pixels become white (icons and stamps are drawn on nothing)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def build_image_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    train_scale: Sequence[float] = (0.6, 1.0),
):
    """``(eval_transform, train_transform)``, both PIL -> float tensor ``[3, image_size, image_size]``.

    Eval: resize the short side to ``image_size``, centre crop. Train: random resized crop (area ``train_scale``),
    colour jitter (0.2 brightness / contrast / saturation).
    """
    if int(image_size) < 8:
        raise InputError(f"image_size must be >= 8 pixels, got {image_size}")
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]
    normalize = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    eval_transform = T.Compose(
        [ToRGB(), T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), *normalize]
    )
    train_transform = T.Compose(
        [
            ToRGB(),
            T.RandomResizedCrop(image_size, scale=tuple(train_scale), interpolation=mode),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            *normalize,
        ]
    )
    return eval_transform, train_transform


def check_pixels(pixels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``pixels`` is a float ``[B, 3, H, W]`` batch."""
    if not torch.is_tensor(pixels) or pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise InputError(
            "pixels must be a float tensor [B, 3, H, W] made by model.image_transform, got "
            f"{type(pixels).__name__} {tuple(getattr(pixels, 'shape', ()))}"
        )
