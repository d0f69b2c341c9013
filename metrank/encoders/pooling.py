"""Global pooling of CNN feature maps ``[B, C, H, W] -> [B, C]``.

* ``avg``: mean over positions. * ``max``: max over positions (R-MAC's building block, Tolias et al. 2016).
* ``gem``: generalised mean ``(mean_{hw} clamp(x, eps)^p)^(1/p)`` with a learnable ``p`` (init 3), Radenović,
  Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018. ``p = 1`` is avg,
  ``p -> inf`` approaches max.
"""

from __future__ import annotations

import torch
from torch import nn

from metrank.errors import InputError

POOLING_TYPES = ("avg", "max", "gem")


class GeneralizedMeanPooling(nn.Module):
    """GeM pooling ``(mean(clamp(x, eps)^p))^(1/p)`` over the spatial dimensions; ``p`` is learnable."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise InputError(f"GeM exponent p must be > 0, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class GlobalPool2d(nn.Module):
    """Average or max over the spatial dimensions, flattened to ``[B, C]``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) if self.kind == "avg" else x.amax(dim=(-2, -1))


def create_pooling(kind: str) -> nn.Module:
    """Pooling module by name: ``"avg"``, ``"max"`` or ``"gem"``."""
    if kind == "gem":
        return GeneralizedMeanPooling()
    if kind in ("avg", "max"):
        return GlobalPool2d(kind)
    raise InputError(f"unknown pooling {kind!r}; valid: {', '.join(POOLING_TYPES)}")


def replace_timm_pooling(trunk: nn.Module, kind: str) -> None:
    """Swap the global pool of a timm CNN (a model with a ``global_pool`` module and no classifier) for ``kind``."""
    if not isinstance(getattr(trunk, "global_pool", None), nn.Module):
        raise InputError(
            f"pooling={kind!r} needs a CNN with a global_pool module; "
            f"{type(trunk).__name__} pools its own way (use pooling=None)"
        )
    trunk.global_pool = create_pooling(kind)
