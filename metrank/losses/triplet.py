"""Triplet margin loss over mined triplets (Schroff et al. 2015, "FaceNet"; Hermans et al. 2017 for batch-hard)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_metric_learning import losses as pml_losses

from metrank import miners as miners_module
from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairwiseLoss, create_reducer, zero_loss
from metrank.pairs import IndicesTuple, label_masks, pml_distance
from metrank.validation import check_choice

Miner = Callable[..., IndicesTuple]


@LOSSES.register("triplet")
class TripletMarginLoss(PairwiseLoss):
    """``[d(a, p) − d(a, n) + m]+`` averaged over the triplets with a non-zero loss (``reduction="mean_active"``).

    ``distance``: ``"euclidean"`` (``‖a − p‖``) or ``"cosine"`` (``d = 1 − S``, so the hinge is
    ``[S_an − S_ap + m]+``). Triplets come from ``indices_tuple`` if given, else from ``miner`` (a name for
    :func:`metrank.miners.create_miner` such as ``"semi_hard"``/``"hard"``/``"batch_hard"``/``"all"``, or any
    callable with the miner signature), else from every valid triplet. Mining uses ``margin`` and ``distance`` of
    the loss. The hinge and reduction are PML's ``TripletMarginLoss`` run on our B³-free index tuples.
    If the miner returns no triplet the loss is a graph-attached 0 (every margin met); if the batch has no valid
    triplet at all (no anchor with both a positive and a negative) it is the same 0 plus a ``NoValidTupleWarning``.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        miner: str | Miner | None = None,
        reduction: str = "mean_active",
    ) -> None:
        super().__init__()
        self.margin = float(margin)
        self.distance = check_choice(distance, ("euclidean", "cosine"), "distance")
        self.reduction = reduction
        self.miner = self._build_miner(miner)
        self._pml = pml_losses.TripletMarginLoss(
            margin=self.margin, distance=pml_distance(distance), reducer=create_reducer(reduction)
        )

    def _build_miner(self, miner: str | Miner | None) -> Miner:
        if callable(miner):
            return miner
        kwargs: dict[str, float | str] = {"distance": self.distance}
        if miner in ("all", "semi_hard", "hard"):
            kwargs["margin"] = self.margin
        if miner is not None:
            return miners_module.create_miner(miner, **kwargs)
        # Without a miner every valid triplet counts; only "mean" needs the ones whose hinge is already 0.
        return miners_module.TripletMarginMiner(
            margin=float("inf") if self.reduction == "mean" else self.margin,
            type_of_triplets="all",
            distance=self.distance,
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        ref = None if inputs.self_ref else inputs.ref_emb
        if indices_tuple is None:
            indices_tuple = self.miner(
                inputs.embeddings, inputs.labels, ref, None if ref is None else inputs.ref_labels
            )
        if len(indices_tuple) != 3:
            raise InputError(
                f"TripletMarginLoss needs (anchor, positive, negative) indices, got a {len(indices_tuple)}-tuple"
            )
        if indices_tuple[0].numel() == 0:
            pos, neg = label_masks(inputs)
            if not (pos.any(1) & neg.any(1)).any():
                return zero_loss(
                    inputs.embeddings,
                    inputs.ref_emb,
                    reason="no valid (anchor, positive, negative) triplet: no anchor has both a positive "
                    "and a negative",
                )
            return inputs.embeddings.sum() * 0 + inputs.ref_emb.sum() * 0  # mined nothing: every margin is met
        return self._pml(
            inputs.embeddings, inputs.labels, indices_tuple, ref, None if ref is None else inputs.ref_labels
        )
