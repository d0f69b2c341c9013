"""Ranking losses with the pytorch-metric-learning calling convention
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None) -> scalar``.

``create_loss(name, **kw)`` builds one by name; :class:`CrossModalLoss` turns any of them into the symmetric
image↔text form ``loss(image_emb, text_emb, ids)`` with global negatives under DDP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metrank.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")

from metrank.losses.base import NoValidTupleWarning  # noqa: E402
from metrank.losses.cross_modal import CrossModalLoss  # noqa: E402
from metrank.losses.hard_negative import HardNegativeLoss, TripletAlignmentLoss  # noqa: E402
from metrank.losses.infonce import InfoNCELoss, MultipleNegativesRankingLoss  # noqa: E402
from metrank.losses.quadruplet import CrossModalQuadrupletLoss, QuadrupletLoss  # noqa: E402
from metrank.losses.triplet import TripletMarginLoss  # noqa: E402

LOSSES.register("triplet")(TripletMarginLoss)
LOSSES.register("hard_negative")(HardNegativeLoss)
LOSSES.register("tal")(TripletAlignmentLoss)
LOSSES.register("quadruplet")(QuadrupletLoss)
LOSSES.register("cross_modal_quadruplet")(CrossModalQuadrupletLoss)
LOSSES.register("infonce")(InfoNCELoss)
LOSSES.register("mnr")(MultipleNegativesRankingLoss)

from metrank.losses import contextual, cprd  # noqa: E402,F401  (register "contextual" and "cprd")


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss: "triplet", "hard_negative", "tal", "quadruplet", "cross_modal_quadruplet",
    "infonce", "mnr", "contextual", "cprd", "logit_kd"."""
    return LOSSES.create(name, **kwargs)


__all__ = [
    "LOSSES",
    "create_loss",
    "CrossModalLoss",
    "CrossModalQuadrupletLoss",
    "HardNegativeLoss",
    "InfoNCELoss",
    "MultipleNegativesRankingLoss",
    "NoValidTupleWarning",
    "QuadrupletLoss",
    "TripletAlignmentLoss",
    "TripletMarginLoss",
]
