"""Ranking losses. Each declares its contract by its base class (:mod:`metrank.losses.base`):
:class:`PairwiseLoss` in the pytorch-metric-learning form ``loss(embeddings, labels, indices_tuple=None, ref_emb=None,
ref_labels=None)``, or :class:`PairedLoss` in the image–text form ``loss(image_emb, text_emb, ids, **extra)``.

``create_loss(name, **kw)`` builds one by name; :class:`CrossModalLoss` turns any pairwise loss (metrank's or PML's)
into the symmetric image↔text form with global negatives under DDP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metrank.losses.base import LOSSES, NoValidTupleWarning, PairedLoss, PairwiseLoss
from metrank.losses.contextual import ContextualLoss
from metrank.losses.cprd import CPRDLoss, LogitDistillationLoss
from metrank.losses.cross_modal import CrossModalLoss
from metrank.losses.hard_negative import HardNegativeLoss, TripletAlignmentLoss
from metrank.losses.infonce import HardNegativeNCELoss, InfoNCELoss, MultipleNegativesRankingLoss
from metrank.losses.memory import MemoryBankLoss, MemoryQueue
from metrank.losses.quadruplet import CrossModalQuadrupletLoss, QuadrupletLoss
from metrank.losses.sigmoid import SigLipLoss
from metrank.losses.triplet import TripletMarginLoss


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss by name (``LOSSES.names()`` lists them)."""
    return LOSSES.create(name, **kwargs)


def is_paired(name: str) -> bool:
    """Whether the loss registered as ``name`` takes paired image–text batches (:class:`PairedLoss`)."""
    entry = LOSSES.get(name)
    return isinstance(entry, type) and issubclass(entry, PairedLoss)


__all__ = [
    "LOSSES",
    "CPRDLoss",
    "ContextualLoss",
    "CrossModalLoss",
    "CrossModalQuadrupletLoss",
    "HardNegativeLoss",
    "HardNegativeNCELoss",
    "InfoNCELoss",
    "LogitDistillationLoss",
    "MemoryBankLoss",
    "MemoryQueue",
    "MultipleNegativesRankingLoss",
    "NoValidTupleWarning",
    "PairedLoss",
    "PairwiseLoss",
    "QuadrupletLoss",
    "SigLipLoss",
    "TripletAlignmentLoss",
    "TripletMarginLoss",
    "create_loss",
    "is_paired",
]
