"""Tuple miners with the pytorch-metric-learning calling convention.

Every miner is called as ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` and returns PML-style index
tuples: ``(a, p, n)`` triplets (anchor rows of ``embeddings``, positive and negative rows of ``ref_emb``) or, for
``topk_hardest``, ``(a, n)`` anchor/negative pairs. Mining runs without gradient on a B×M distance matrix; nothing
of size B³ is ever allocated (triplet mining walks the positive pairs in chunks), so semi-hard mining at B = 1024
needs a few MiB of working memory plus the returned indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metrank.errors import InputError
from metrank.pairs import DISTANCES, ChecksInputs, LossInputs, label_masks, ranking_distance, topk_distinct
from metrank.registry import Registry
from metrank.validation import check_choice, check_positive_int

MINERS: Registry[nn.Module] = Registry("miner")

# Elements of the (positive pair × reference) block examined at once by the triplet miner.
_CHUNK_ELEMENTS = 1 << 22


class BaseMiner(ChecksInputs):
    """Validates inputs, builds the (no-grad) ranking distance and label masks, then calls :meth:`mine`."""

    def __init__(self, distance: str = "euclidean") -> None:
        super().__init__()
        self.distance = check_choice(distance, DISTANCES, "distance")

    @torch.no_grad()
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        dist = ranking_distance(inputs.embeddings.detach(), inputs.ref_emb.detach(), self.distance)
        pos, neg = label_masks(inputs)
        return self.mine(dist, pos, neg, inputs)

    def mine(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, inputs: LossInputs
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class TripletMarginMiner(BaseMiner):
    """Triplets ``(a, p, n)`` selected by their margin ``d_an − d_ap`` (same definitions as PML's miner).

    ``"all"``: every triplet violating the margin (``d_an − d_ap ≤ margin``, i.e. every triplet with a non-zero
    triplet loss); ``"semihard"``: ``0 < d_an − d_ap ≤ margin``; ``"hard"``: ``d_an − d_ap ≤ 0``.
    ``margin=float("inf")`` with ``"all"`` returns every valid triplet. Output order is lexicographic in (a, p, n).
    """

    TYPES = ("all", "semihard", "hard")

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", distance: str = "euclidean") -> None:
        super().__init__(distance)
        self.margin = float(margin)
        if type_of_triplets not in self.TYPES:
            raise InputError(f"type_of_triplets must be one of {self.TYPES}, got {type_of_triplets!r}")
        self.type_of_triplets = type_of_triplets

    def mine(self, dist, pos, neg, inputs):
        a_idx, p_idx = pos.nonzero(as_tuple=True)
        d_ap = dist[a_idx, p_idx]
        chunk = max(1, _CHUNK_ELEMENTS // dist.shape[1])
        out_a, out_p, out_n = [], [], []
        for start in range(0, a_idx.shape[0], chunk):
            a, p = a_idx[start : start + chunk], p_idx[start : start + chunk]
            margin = dist[a] - d_ap[start : start + chunk, None]  # d_an − d_ap for every candidate n
            keep = neg[a] & (margin <= self.margin)
            if self.type_of_triplets == "semihard":
                keep &= margin > 0
            elif self.type_of_triplets == "hard":
                keep &= margin <= 0
            rows, n = keep.nonzero(as_tuple=True)
            out_a.append(a[rows])
            out_p.append(p[rows])
            out_n.append(n)
        if not out_a:
            empty = a_idx.new_empty(0)
            return empty, empty.clone(), empty.clone()
        return torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)


@MINERS.register("batch_hard")
class BatchHardMiner(BaseMiner):
    """Batch-hard triplets (Hermans et al. 2017): per anchor its farthest positive and its closest negative.

    Anchors without a positive or without a negative are skipped.
    """

    def mine(self, dist, pos, neg, inputs):
        hardest_pos = dist.masked_fill(~pos, float("-inf")).argmax(1)
        hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1)
        anchors = (pos.any(1) & neg.any(1)).nonzero().flatten()
        return anchors, hardest_pos[anchors], hardest_neg[anchors]


@MINERS.register("cross_modal_hardest")
class CrossModalHardestMiner(BaseMiner):
    """VSE++ max-violation triplets: every positive pair ``(a, p)`` with the hardest negative of its anchor.

    Negatives are reference rows with a different id, so rows sharing an image id (e.g. the 5 COCO captions of one
    image) are never used as each other's negatives. Default distance is cosine (``−S``).
    """

    def __init__(self, distance: str = "cosine") -> None:
        super().__init__(distance)

    def mine(self, dist, pos, neg, inputs):
        hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1)
        a, p = (pos & neg.any(1, keepdim=True)).nonzero(as_tuple=True)
        return a, p, hardest_neg[a]


@MINERS.register("topk_hardest")
class TopKHardestNegativeMiner(BaseMiner):
    """The ``k`` hardest negatives of every anchor, returned as ``(a, n)`` with ``len(a) == B·k``.

    Anchor ``i`` owns entries ``i·k … i·k + k − 1`` ordered hardest first, so ``n.view(B, k)`` is the per-query
    list (used by CPRD). With ``distinct=True`` at most one reference row per ``ref_labels`` value is taken (the
    hardest), so an image repeated in the reference set (several captions of it in a batch) fills one slot, not
    several (:func:`metrank.pairs.topk_distinct`). ``InputError`` if some anchor has fewer than ``k`` (distinct)
    negatives in the reference set. Default distance is cosine: "hardest" = most similar.
    """

    def __init__(self, k: int = 8, distance: str = "cosine", distinct: bool = False) -> None:
        super().__init__(distance)
        k = check_positive_int(k, "k")
        self.k = int(k)
        self.distinct = bool(distinct)

    def mine(self, dist, pos, neg, inputs):
        groups = inputs.ref_labels if self.distinct else torch.arange(dist.shape[1], device=dist.device)
        n = topk_distinct(-dist, neg, groups, self.k)
        a = torch.arange(dist.shape[0], device=dist.device).repeat_interleave(self.k)
        return a, n.flatten()


@MINERS.register("all")
def all_triplets_miner(margin: float = 0.2, distance: str = "euclidean") -> TripletMarginMiner:
    """Every triplet with a non-zero triplet loss (``d_an − d_ap ≤ margin``)."""
    return TripletMarginMiner(margin, "all", distance)


@MINERS.register("semi_hard")
def semi_hard_miner(margin: float = 0.2, distance: str = "euclidean") -> TripletMarginMiner:
    """Semi-hard triplets (FaceNet): ``0 < d_an − d_ap ≤ margin``."""
    return TripletMarginMiner(margin, "semihard", distance)


@MINERS.register("hard")
def hard_miner(margin: float = 0.2, distance: str = "euclidean") -> TripletMarginMiner:
    """Hard triplets: the negative is at least as close as the positive (``d_an − d_ap ≤ 0``)."""
    return TripletMarginMiner(margin, "hard", distance)


def create_miner(name: str, **kwargs: Any) -> nn.Module:
    """Build a miner by name: ``"all"``, ``"semi_hard"``, ``"hard"``, ``"batch_hard"``, ``"cross_modal_hardest"``,
    ``"topk_hardest"``."""
    return MINERS.create(name, **kwargs)
