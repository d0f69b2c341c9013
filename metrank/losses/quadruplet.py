"""Quadruplet loss (Chen et al., CVPR 2017, "Beyond triplet loss") and its cross-modal CDMLMR form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metrank.distributed import rank
from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairedLoss, PairwiseLoss, create_reducer, reduce_losses, zero_loss
from metrank.losses.cross_modal import gather_pairs, symmetric_loss
from metrank.pairs import IndicesTuple, check_normalized, label_masks, pair_masks, squared_euclidean


def hardest_anchor_free_pair(
    dist: torch.Tensor, pair_neg: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor
) -> torch.Tensor:
    """For every anchor row ``a``: ``min dist[l, k]`` over negative pairs ``(l, k)`` with neither label equal to
    ``labels[a]`` (``inf`` if none), in O(B·M).

    The globally closest negative pair ``(l*, k*)`` serves every anchor whose class is neither of its two classes;
    only anchors of those (at most two) classes need a second, class-excluding search.
    """
    masked = dist.masked_fill(~pair_neg, float("inf"))
    flat = int(masked.argmin())
    l_star, k_star = divmod(flat, masked.shape[1])
    out = masked[l_star, k_star].expand(labels.shape[0])
    for cls in {int(labels[l_star]), int(ref_labels[k_star])}:
        excluded = (labels == cls)[:, None] | (ref_labels == cls)[None, :]
        out = torch.where(labels == cls, masked.masked_fill(excluded, float("inf")).amin(), out)
    return out


@LOSSES.register("quadruplet")
class QuadrupletLoss(PairwiseLoss):
    """Batch-hard quadruplet loss on squared Euclidean distances ``g² = ‖x − y‖² = 2 − 2S``:

    ``[g²_ap − g²_an + α1]+ + [g²_ap − g²_lk + α2]+`` per anchor ``a`` with its hardest (farthest) positive ``p``,
    hardest (closest) negative ``n`` and the hardest negative pair ``(l, k)`` — ``l`` an anchor-side row, ``k`` a
    reference row, ``y_l ≠ y_k`` — containing neither the anchor's class. Fixed margins ``α1 = 1.0``, ``α2 = 0.5``
    (on the squared-distance scale, whose range is [0, 4]); with ``adaptive=True`` each batch uses
    ``α = w·(μ_neg − μ_pos)`` (``weights = (1, 0.5)``, μ = mean positive / negative squared distance of the batch,
    detached and clamped at 0), as in Chen et al. Anchors need a positive, a negative and an anchor-free negative
    pair (so at least three classes); the rest are skipped. ``reduction``: "mean" over anchors (default), "sum"
    or "mean_active". An ``indices_tuple`` restricts the positive/negative candidates of each anchor.
    """

    def __init__(
        self,
        margin1: float = 1.0,
        margin2: float = 0.5,
        adaptive: bool = False,
        weights: tuple[float, float] = (1.0, 0.5),
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if not adaptive and margin1 < margin2:
            raise InputError(
                f"margin1 ({margin1}) should be >= margin2 ({margin2}): the anchor-free pair term is the weaker push"
            )
        self.margin1, self.margin2 = float(margin1), float(margin2)
        self.adaptive = adaptive
        self.weights = (float(weights[0]), float(weights[1]))
        self.reducer = create_reducer(reduction)

    def margins(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.adaptive:
            return dist.new_tensor(self.margin1), dist.new_tensor(self.margin2)
        gap = (dist.detach()[neg].mean() - dist.detach()[pos].mean()).clamp_min(0)
        return self.weights[0] * gap, self.weights[1] * gap

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        pos, neg = pair_masks(inputs, indices_tuple)
        dist = squared_euclidean(inputs.embeddings, inputs.ref_emb)
        free = hardest_anchor_free_pair(dist, label_masks(inputs)[1], inputs.labels, inputs.ref_labels)
        anchors = (pos.any(1) & neg.any(1) & torch.isfinite(free)).nonzero().flatten()
        if anchors.numel() == 0:
            return zero_loss(
                inputs.embeddings,
                inputs.ref_emb,
                reason="no valid quadruplet (an anchor needs a positive, a negative and a negative pair "
                "of two other classes, i.e. >= 3 classes)",
            )
        alpha1, alpha2 = self.margins(dist, pos, neg)
        d = dist[anchors]
        hardest_pos = d.masked_fill(~pos[anchors], float("-inf")).amax(1)
        hardest_neg = d.masked_fill(~neg[anchors], float("inf")).amin(1)
        losses = F.relu(hardest_pos - hardest_neg + alpha1) + F.relu(hardest_pos - free[anchors] + alpha2)
        return reduce_losses(losses, self.reducer)


@LOSSES.register("cross_modal_quadruplet")
class CrossModalQuadrupletLoss(PairedLoss):
    """CDMLMR (Huang & Peng, ICME 2017, "Cross-modal Deep Metric Learning with Multi-task Regularization"):
    ``L = L_quad_cross + λ·L_sscon`` for a paired batch where row ``i`` of ``image_emb`` and ``text_emb`` co-occur
    and ``labels[i]`` is their class, or ``-1`` for an unlabelled co-occurring pair.

    ``L_quad_cross``: :class:`QuadrupletLoss` on labelled rows with anchor and positive from different modalities,
    both directions (image anchors vs text references and vice versa), averaged.

    ``L_sscon`` (our reading of the abstract's "semi-supervised contrastive loss ... on both labeled and unlabeled
    data"): a Hadsell-style contrastive loss over every cross-modal pair (image i, text j) of the batch, with
    ``d = ‖x_i − t_j‖``:

    - similar (pulled, ``½d²``): co-occurring pairs ``i = j`` (labelled or not) and labelled pairs with equal labels;
    - dissimilar (pushed, ``½[m − d]+²``, ``m = contrastive_margin``): labelled pairs with different labels, and
      non-co-occurring pairs that involve an unlabelled row (assumed unrelated, as in-batch negatives are in
      unsupervised image–text matching);

    averaged over all pairs, then over both directions (text i vs image j). Under DDP both terms use every rank's
    rows as references (co-occurrence is matched by global row index).
    """

    def __init__(
        self, quadruplet: QuadrupletLoss | None = None, lam: float = 1.0, contrastive_margin: float = 1.0
    ) -> None:
        super().__init__()
        self.quadruplet = quadruplet if quadruplet is not None else QuadrupletLoss()
        self.lam = float(lam)
        self.contrastive_margin = float(contrastive_margin)

    def contrastive(
        self, anchors: torch.Tensor, refs: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, offset: int
    ) -> torch.Tensor:
        """One direction of ``L_sscon``: anchors are this rank's rows, ``refs`` all ranks' rows of the other
        modality; local row ``i`` co-occurs with reference row ``offset + i``."""
        dist2 = squared_euclidean(anchors, refs)
        dist = dist2.clamp_min(1e-12).sqrt()
        rows = torch.arange(anchors.shape[0], device=anchors.device) + offset
        co_occurring = rows[:, None] == torch.arange(refs.shape[0], device=refs.device)[None, :]
        labelled = (labels >= 0)[:, None] & (ref_labels >= 0)[None, :]
        same = labels[:, None] == ref_labels[None, :]
        similar = co_occurring | (labelled & same)
        pulled = 0.5 * dist2[similar].sum()
        pushed = 0.5 * F.relu(self.contrastive_margin - dist[~similar]).pow(2).sum()
        return (pulled + pushed) / similar.numel()

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_pairs(image_emb, text_emb, labels)
        check_normalized(image_emb, "image_emb")
        check_normalized(text_emb, "text_emb")
        image_ref, text_ref, ref_labels = gather_pairs(image_emb, text_emb, labels)
        offset = rank() * image_emb.shape[0]
        sscon = 0.5 * (
            self.contrastive(image_emb, text_ref, labels, ref_labels, offset)
            + self.contrastive(text_emb, image_ref, labels, ref_labels, offset)
        )
        keep, ref_keep = labels >= 0, ref_labels >= 0
        if not keep.any() or not ref_keep.any():
            quad = zero_loss(
                image_emb,
                text_emb,
                image_ref,
                text_ref,
                reason="no labelled pair for the quadruplet term of CrossModalQuadrupletLoss",
            )
        else:
            quad = symmetric_loss(
                self.quadruplet,
                image_emb[keep],
                text_emb[keep],
                labels[keep],
                image_ref[ref_keep],
                text_ref[ref_keep],
                ref_labels[ref_keep],
            )
        return quad + self.lam * sscon
