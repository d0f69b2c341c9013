"""Teachers for ranking distillation (CPRD): callables that score (image, text) pairs.

A teacher is any callable ``teacher(images, texts) -> scores [n]`` that scores the n pairs
``(images[i], texts[i])`` (higher = better match). ``images``/``texts`` are whatever the teacher consumes (pixels,
token ids, token features, ...): a tensor, a list, a tuple of tensors or a dict of tensors whose first dimension is
the pair index. This module provides a trainable cross-encoder head (:class:`CrossAttentionTeacher`), an adapter
for a frozen dual encoder (:class:`TowerScoreTeacher`) and a cache for frozen teachers (:class:`CachedTeacher`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrank.errors import InputError


class Teacher(Protocol):
    """``scores = teacher(images, texts)``: one score per (images[i], texts[i]) pair, shape [n]."""

    def __call__(self, images: Any, texts: Any) -> torch.Tensor: ...


def take_rows(batch: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of a batch: tensor/ndarray rows, list items, or the rows of every tuple/dict member."""
    if isinstance(batch, torch.Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, np.ndarray):
        return batch[index.cpu().numpy()]
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {key: take_rows(batch[key], index) for key in batch.keys()}
    if isinstance(batch, tuple):
        return tuple(take_rows(member, index) for member in batch)
    if isinstance(batch, list):
        return [batch[i] for i in index.tolist()]
    raise InputError(
        f"cannot index teacher inputs of type {type(batch).__name__}; pass a tensor, ndarray, list, "
        "tuple or dict of tensors with one row per batch item"
    )


class CachedTeacher:
    """Memoises a frozen teacher's pair scores by (image id, text id).

    ``cached(images, texts, keys, image_rows=None, text_rows=None)`` scores n pairs: ``keys`` is an int tensor
    [n, 2] of (image id, text id) per pair; pair p is (images[image_rows[p]], texts[text_rows[p]]), or
    (images[p], texts[p]) without rows. Only pairs not seen before are sent to the wrapped teacher (in one call,
    under ``torch.no_grad``); ``hits``/``misses`` count the looked-up pairs.
    """

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.scores: dict[tuple[int, int], float] = {}
        self.hits = self.misses = 0

    def __call__(
        self,
        images: Any,
        texts: Any,
        keys: torch.Tensor,
        image_rows: torch.Tensor | None = None,
        text_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if keys.ndim != 2 or keys.shape[1] != 2:
            raise InputError(f"keys must have shape (n, 2) = (image id, text id) per pair, got {tuple(keys.shape)}")
        pairs = [tuple(k) for k in keys.tolist()]
        first: dict[tuple[int, int], int] = {}
        for p, key in enumerate(pairs):
            if key not in self.scores:
                first.setdefault(key, p)
        if first:
            at = torch.tensor(list(first.values()), dtype=torch.long)
            with torch.no_grad():
                fresh = self.teacher(
                    take_rows(images, at if image_rows is None else image_rows.cpu()[at]),
                    take_rows(texts, at if text_rows is None else text_rows.cpu()[at]),
                )
            self.scores.update(zip(first, fresh.detach().float().cpu().tolist()))
        self.misses += len(first)
        self.hits += len(pairs) - len(first)
        return torch.tensor([self.scores[p] for p in pairs], dtype=torch.float32)


class TowerScoreTeacher(nn.Module):
    """External teacher from a frozen dual encoder: score = cosine(encode_image(images), encode_text(texts)).

    ``model`` is any object with ``encode_image``/``encode_text`` (a :class:`metrank.encoders.RetrievalModel`,
    an open_clip model); it is frozen and put in eval mode.
    """

    model: Any  # any module with encode_image / encode_text

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Any, texts: Any) -> torch.Tensor:
        self.model.eval()
        image = F.normalize(self.model.encode_image(images).float(), dim=-1)
        text = F.normalize(self.model.encode_text(texts).float(), dim=-1)
        return (image * text).sum(-1)


class _CrossBlock(nn.Module):
    """Pre-norm transformer block: text self-attention, text -> image cross-attention, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mem, self.norm_mlp = (nn.LayerNorm(width) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, text: torch.Tensor, image: torch.Tensor, text_padding: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_self(text)
        text = text + self.self_attn(h, h, h, key_padding_mask=text_padding, need_weights=False)[0]
        mem = self.norm_mem(image)
        text = text + self.cross_attn(self.norm_cross(text), mem, mem, need_weights=False)[0]
        return text + self.mlp(self.norm_mlp(text))


class CrossAttentionTeacher(nn.Module):
    """Small cross-encoder: text tokens attend to image tokens, masked mean pool, MLP -> match logit.

    ``forward(images, texts) -> [n]`` with ``images`` image token features [n, N_img, image_dim] (or pooled
    [n, image_dim], one token) and ``texts`` text token features [n, N_txt, text_dim] (or pooled [n, text_dim]),
    or a tuple ``(features, mask)`` with mask [n, N_txt] True on real tokens. Train it with :meth:`itm_loss`
    (image-text matching, ALBEF style) on features from the two towers, then use it (frozen, optionally through
    :class:`CachedTeacher`) as the CPRD teacher.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, width)
        self.text_proj = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList(_CrossBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, images: torch.Tensor, texts: Any) -> torch.Tensor:
        features, mask = texts if isinstance(texts, tuple) else (texts, None)
        image = self.image_proj(images if images.ndim == 3 else images[:, None])
        text = self.text_proj(features if features.ndim == 3 else features[:, None])
        padding = None if mask is None else ~mask.bool()
        for block in self.blocks:
            text = block(text, image, padding)
        weights = torch.ones(text.shape[:2], device=text.device) if mask is None else mask.to(text.dtype)
        pooled = (text * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)

    def itm_loss(
        self,
        images: torch.Tensor,
        texts: Any,
        ids: torch.Tensor,
        similarity: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Binary image-text matching loss on the B positive pairs plus one mined negative per image and per text.

        Row i of ``images`` and ``texts`` is a matching pair; ``ids`` (image id per row) marks rows that share an
        image, which are never used as negatives. The negative text of image i is drawn from
        ``softmax(similarity[i])`` over its negatives (hard-negative mining with the dual encoder's [B, B] image-text
        similarity, as in ALBEF) or uniformly when ``similarity`` is None; likewise per text with ``similarity.T``.
        Returns the mean BCE-with-logits over the positive and negative pairs.
        """
        n = ids.shape[0]
        negative = ids[:, None] != ids[None, :]
        if not negative.any():
            raise InputError("itm_loss needs at least two different ids in the batch to draw negatives")
        logits = torch.zeros(n, n, device=ids.device) if similarity is None else similarity.detach().float()
        rows = negative.any(1).nonzero().flatten()
        # softmax over the negatives of each row (masked to -inf elsewhere), then one draw per row
        probs = logits.masked_fill(~negative, float("-inf"))[rows].softmax(1)
        neg_text = torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(ids.device)
        probs_t = logits.T.masked_fill(~negative, float("-inf"))[rows].softmax(1)
        neg_image = torch.multinomial(probs_t.cpu(), 1, generator=generator).flatten().to(ids.device)
        all_rows = torch.arange(n, device=ids.device)
        image_idx = torch.cat([all_rows, rows, neg_image])
        text_idx = torch.cat([all_rows, neg_text, rows])
        scores = self(take_rows(images, image_idx), take_rows(texts, text_idx))
        targets = torch.cat([torch.ones(n), torch.zeros(2 * len(rows))]).to(scores)
        return F.binary_cross_entropy_with_logits(scores, targets)
