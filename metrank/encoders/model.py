"""``RetrievalModel``: an image tower (and optionally a text tower) split into backbone and projection head.

The split lets training cache backbone features once and train only the heads:

    image_features(pixels) -> [B, F]   backbone + pooling (frozen-able)
    image_head(features)   -> [B, D]   projection, not normalised
    encode_image(pixels)   =  l2_normalise(image_head(image_features(pixels)))

and likewise ``text_features`` / ``text_head`` / ``encode_text`` for tokens from ``tokenize``. ``embed_images`` and
``embed_texts`` are the batched, eval-mode, no-grad numpy conveniences used by search and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from metrank.encoders.transforms import check_pixels
from metrank.errors import InputError
from metrank.images import open_rgb

ImageInput = Image.Image | str


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, or a ``ValueError`` naming the positions of empty / non-string entries."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise InputError(
            f"texts must be non-empty strings; got empty or non-string text at positions {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''} (drop them or give them a caption)"
        )
    return texts


class MatmulProjection(nn.Module):
    """``x @ weight`` with a ``[F, D]`` weight: the projection matrix of an open_clip tower, lifted out of it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class RetrievalModel(nn.Module):
    """Image (+ optional text) encoder producing L2-normalised embeddings of size ``embed_dim``.

    Build it with ``metrank.encoders.create_model``; ``config`` holds the name and keyword arguments that rebuild the
    same architecture (``load_checkpoint`` uses it).
    """

    def __init__(
        self,
        image_backbone: nn.Module,
        image_projection: nn.Module,
        embed_dim: int,
        image_transform: Callable[[Image.Image], torch.Tensor],
        train_image_transform: Callable[[Image.Image], torch.Tensor],
        config: dict[str, Any],
        text_backbone: nn.Module | None = None,
        text_projection: nn.Module | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if (text_backbone is None) != (tokenizer is None):
            raise InputError("a text tower needs both a text backbone and a tokenizer")
        self.image_backbone = image_backbone
        self.image_projection = image_projection
        self.text_backbone = text_backbone
        self.text_projection = (
            text_projection if text_projection is not None else (nn.Identity() if text_backbone is not None else None)
        )
        self.embed_dim = int(embed_dim)
        self.image_transform = image_transform
        self.train_image_transform = train_image_transform
        self.config = config
        self._tokenizer = tokenizer

    @property
    def has_text(self) -> bool:
        return self.text_backbone is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ----------------------------------------------------------------------------------------------- image tower
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[B, F]`` of a pixel batch ``[B, 3, H, W]`` (from ``image_transform``)."""
        check_pixels(pixels)
        return self.image_backbone(pixels)

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        """Projection ``[B, F] -> [B, D]`` (not normalised)."""
        return self.image_projection(features)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        return F.normalize(self.image_head(self.image_features(pixels)), dim=-1)

    # ------------------------------------------------------------------------------------------------ text tower
    def _require_text(self) -> None:
        if not self.has_text:
            raise InputError(
                f"model {self.config.get('name')!r} has no text tower; use an image-text model such "
                "as 'lite0-minilm' or 'open_clip/<config>'"
            )

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, L]`` for ``texts``; empty or whitespace-only strings raise ``ValueError``."""
        self._require_text()
        texts = check_texts(texts)
        if not texts:
            raise InputError("tokenize() got no texts")
        assert self._tokenizer is not None  # _require_text checked it
        return self._tokenizer(texts)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled text-backbone features ``[B, F_t]`` of token ids from ``tokenize``."""
        self._require_text()
        assert self.text_backbone is not None
        return self.text_backbone(tokens)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        """Projection ``[B, F_t] -> [B, D]`` (not normalised)."""
        self._require_text()
        assert self.text_projection is not None
        return self.text_projection(features)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``."""
        return F.normalize(self.text_head(self.text_features(tokens)), dim=-1)

    def forward(self, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """``(encode_image(pixels), encode_text(tokens))``; either may be ``None``."""
        image = self.encode_image(pixels) if pixels is not None else None
        text = self.encode_text(tokens) if tokens is not None else None
        return image, text

    # ------------------------------------------------------------------------------------------- numpy helpers
    @torch.no_grad()
    def _embed(
        self,
        items: Sequence[Any],
        batch_size: int,
        progress: bool,
        desc: str,
        to_batch: Callable[[Sequence[Any]], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> np.ndarray:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            device = self.device
            chunks = []
            starts = range(0, len(items), batch_size)
            for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
                chunks.append(encode(to_batch(items[start : start + batch_size]).to(device)).float().cpu().numpy())
        finally:
            self.train(was_training)
        if not chunks:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Normalised embeddings ``np.float32 [N, D]`` of PIL images (or image file paths), in eval mode."""

        def to_batch(chunk: Sequence[ImageInput]) -> torch.Tensor:
            return torch.stack([self.image_transform(open_rgb(im) if isinstance(im, str) else im) for im in chunk])

        return self._embed(list(images), batch_size, progress, "embed images", to_batch, self.encode_image)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """Normalised embeddings ``np.float32 [N, D]`` of strings, in eval mode."""
        self._require_text()
        return self._embed(check_texts(texts), batch_size, progress, "embed texts", self.tokenize, self.encode_text)
