"""Softmax cross-entropy over in-batch candidates: InfoNCE / CLIP, its hard-negative-weighted form (HN-NCE / DCL) and
multiple negatives ranking."""

from __future__ import annotations

import math

import torch
from torch import nn

from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairwiseLoss, zero_loss
from metrank.pairs import IndicesTuple, LossInputs, check_normalized, pair_masks, similarity_matrix
from metrank.validation import check_embeddings


def multi_positive_cross_entropy(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean over positive pairs ``(i, p)`` of ``−log( e^{z_ip} / (e^{z_ip} + Σ_{n ∈ neg(i)} e^{z_in}) )``.

    Each positive competes only with the negatives, so other positives of the same id are not false negatives
    (PML's ``NTXentLoss`` definition); with one positive per row it is the usual cross-entropy with the diagonal
    as target. Callers guarantee at least one positive pair.
    """
    a, p = pos.nonzero(as_tuple=True)
    has_neg = neg.any(1)
    rows = has_neg.nonzero().flatten()
    neg_lse = logits.new_full((logits.shape[0],), float("-inf"))
    neg_lse[rows] = torch.logsumexp(logits[rows].masked_fill(~neg[rows], float("-inf")), dim=1)
    z_ap = logits[a, p]
    return (torch.logaddexp(z_ap, neg_lse[a]) - z_ap).mean()


def _forward_cross_entropy(
    inputs: LossInputs,
    indices_tuple: IndicesTuple | None,
    scale: torch.Tensor,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    pos, neg = pair_masks(inputs, indices_tuple)
    if not pos.any():
        return zero_loss(inputs.embeddings, inputs.ref_emb, reason="no positive pair in the batch")
    refs = inputs.ref_emb
    if extra_negatives is not None:
        refs = torch.cat([refs, extra_negatives])
        pos = torch.cat([pos, pos.new_zeros(pos.shape[0], extra_negatives.shape[0])], dim=1)
        neg = torch.cat([neg, neg.new_ones(neg.shape[0], extra_negatives.shape[0])], dim=1)
    logits = scale * similarity_matrix(inputs.embeddings, refs)
    return multi_positive_cross_entropy(logits, pos, neg)


@LOSSES.register("infonce")
class InfoNCELoss(PairwiseLoss):
    """InfoNCE with a learnable logit scale (CLIP, Radford et al. 2021; van den Oord et al. 2018), one direction:
    mean over positive pairs of ``−log softmax`` of ``s·S`` restricted to the pair and the anchor's negatives.

    ``CrossModalLoss(InfoNCELoss())`` is CLIP's ``½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)]``. Positives are references with the
    anchor's label/id, so duplicated images or captions in a batch are not pushed apart. The scale
    ``s = exp(logit_scale)`` starts at ``1/temperature`` (1/0.07) and is capped at ``max_scale`` (100) in the forward
    pass; with ``learnable=False`` it is a fixed buffer (then equal to PML's ``NTXentLoss(temperature)``). The
    parameter lives in this module: give it to the optimiser (and, under DDP, keep the loss inside the wrapped
    module so its gradient is averaged too).
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0 or max_scale <= 0:
            raise InputError(f"temperature and max_scale must be > 0, got {temperature} and {max_scale}")
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_scale = float(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        return _forward_cross_entropy(inputs, indices_tuple, self.scale.to(embeddings.dtype))


def hard_negative_cross_entropy(
    logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Mean over positive pairs ``(i, p)`` (of anchors that have negatives) of HN-NCE's
    ``−log( e^{z_ip} / (α e^{z_ip} + Σ_{n ∈ neg(i)} w_in e^{z_in}) )`` with importance weights
    ``w_in = |neg(i)| · e^{β z_in} / Σ_{n' ∈ neg(i)} e^{β z_in'}`` (mean weight 1).

    Computed stably as ``logaddexp(log α + z_ip, N_i) − z_ip`` with
    ``N_i = log|neg(i)| + LSE_n((1 + β) z_in) − LSE_n(β z_in)``. At α = 1, β = 0 this is
    :func:`multi_positive_cross_entropy` (InfoNCE); α = 0 drops the positive from the denominator (DCL).
    """
    rows = neg.any(1)
    a, p = (pos & rows[:, None]).nonzero(as_tuple=True)
    z, outside = logits[rows], ~neg[rows]
    count = neg[rows].sum(1).to(logits.dtype)

    def lse_negatives(x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(x.masked_fill(outside, float("-inf")), 1)

    neg_term = logits.new_full((logits.shape[0],), float("-inf"))
    neg_term[rows] = count.log() + lse_negatives((1 + beta) * z) - lse_negatives(beta * z)
    z_ap = logits[a, p]
    if alpha == 0:
        return (neg_term[a] - z_ap).mean()
    return (torch.logaddexp(math.log(alpha) + z_ap, neg_term[a]) - z_ap).mean()


@LOSSES.register("hn_nce")
class HardNegativeNCELoss(InfoNCELoss):
    """HN-NCE, hard-negative-weighted InfoNCE (Radenovic et al., "Filtering, Distillation, and Hard Negatives for
    Vision-Language Pre-Training", CVPR 2023), one direction; with ``alpha=0`` the decoupled contrastive loss DCL
    (Yeh et al., ECCV 2022) and its hard-negative form.

    Each negative's term in the softmax denominator is reweighted by ``w = |neg|·softmax_neg(β·z)`` (β = 0: uniform
    weights, β > 0: harder negatives count more) and the positive's own term by ``alpha``
    (:func:`hard_negative_cross_entropy`; the weights are differentiated through, as in the reference
    implementation). ``alpha=1, beta=0`` is exactly :class:`InfoNCELoss`. Temperature / learnable logit scale as
    :class:`InfoNCELoss`; ``CrossModalLoss(HardNegativeNCELoss())`` is the symmetric image↔text loss. The paper
    uses β ≈ 0.25 (hence the default) and α = 1.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.25,
        temperature: float = 0.07,
        learnable: bool = True,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__(temperature, learnable, max_scale)
        if alpha < 0 or beta < 0:
            raise InputError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
        self.alpha, self.beta = float(alpha), float(beta)

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
        if not (pos & neg.any(1, keepdim=True)).any():
            return zero_loss(inputs.embeddings, inputs.ref_emb, reason="no positive pair with a negative in the batch")
        logits = self.scale.to(embeddings.dtype) * similarity_matrix(inputs.embeddings, inputs.ref_emb)
        return hard_negative_cross_entropy(logits, pos, neg, self.alpha, self.beta)


@LOSSES.register("mnr")
class MultipleNegativesRankingLoss(PairwiseLoss):
    """Multiple negatives ranking loss (Henderson et al. 2017; sentence-transformers), one direction: cross-entropy
    of ``scale·S`` (scale 20, i.e. temperature 0.05) from each anchor to its positive reference against all other
    in-batch references, plus optional explicit ``hard_negatives`` rows that are negatives for every anchor.

    Positives are the references sharing the anchor's label (use ``labels = arange(B)`` for plain pairs); other
    positives are not counted as negatives.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        if scale <= 0:
            raise InputError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        if hard_negatives is not None:
            check_embeddings(hard_negatives, "hard_negatives", dim=embeddings.shape[1])
            check_normalized(hard_negatives, "hard_negatives")
        return _forward_cross_entropy(inputs, indices_tuple, embeddings.new_tensor(self.scale), hard_negatives)
