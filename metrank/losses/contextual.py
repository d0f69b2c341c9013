"""Contextual loss: metric learning to rank via contextual similarity optimisation.

Liao, Tsiligkaridis, Kulis, "Supervised Metric Learning to Rank for Retrieval via Contextual Similarity
Optimization", ICML 2023 (reference code: github.com/Chris210634/metric-learning-using-contextual-similarity).

With S the cosine similarity matrix of a batch, D = max(2 - 2S, 0) and labels Y (Y_ij = 1 for same class):

1. k-NN membership ``N_k[i, j] = step(v_k(i) + eps - D_ij)``, v_k(i) the k-th smallest distance of row i (self
   included). The step is straight-through: its backward multiplies the incoming gradient by a constant ``gain``
   (d N / d(v_k + eps - D) := gain) and the threshold v_k is treated as a constant.
2. ``I = N_k N_k^T / |N_k(i)|``, ``I' = (1 - N_k)(1 - N_k)^T / |not N_k(i)|`` (denominators detached),
   ``W = 1/2 (I + I') * N_k``.
3. Query expansion with k/2 neighbours: ``R = N_{k/2} * N_{k/2}^T``, ``J = R W / |R(i)|`` (denominator not
   detached, as in the reference code); contextual similarity ``w = 1/2 (J + J^T)`` in [0, 1].
4. ``L_ctx = 1/n^2 sum_{i != j} [Y_ij (1 - w_ij)^2 + (1 - Y_ij) w_ij^2]``.
5. ``L = lam * L_ctx + (1 - lam - gamma) * L_con + gamma * (mean(S) - s_reg)^2`` with the margin contrastive term
   ``L_con = mean_active([m_pos - S]_+ over positives) + mean_active([S - m_neg]_+ over negatives)``, where
   mean_active averages over the non-zero hinges (0 when none is active).
"""

from __future__ import annotations

import torch

from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairwiseLoss


class StraightThroughStep(torch.autograd.Function):
    """``step(x - threshold) = 1[x >= threshold]`` forward; backward ``d/dx = gain``, threshold gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, gain: float) -> torch.Tensor:
        ctx.gain = gain
        return (x >= threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.gain, None, None


def knn_membership(distances: torch.Tensor, k: int, eps: float, gain: float = 10.0) -> torch.Tensor:
    """Soft-backward k-NN indicator ``N_k[i, j] = step(v_k(i) + eps - D_ij)`` (self included, ties kept)."""
    kth = distances.topk(k, dim=1, largest=False).values[:, -1:].detach()
    return StraightThroughStep.apply(eps - distances, -kth, gain)


def contextual_similarity(sim: torch.Tensor, k: int = 4, eps: float = 0.05, gain: float = 10.0) -> torch.Tensor:
    """Contextual similarity ``w`` in [0, 1] of a square cosine-similarity matrix (steps 1-3 of the module doc)."""
    distances = (2.0 - 2.0 * sim).clamp(min=0.0)
    nk = knn_membership(distances, k, eps, gain)
    not_nk = 1.0 - nk
    inside = nk @ nk.T / nk.sum(1, keepdim=True).detach()
    # clamp: a row whose k-NN covers the whole batch has an empty complement (0 / 0 -> 0 instead of NaN)
    outside = not_nk @ not_nk.T / not_nk.sum(1, keepdim=True).detach().clamp(min=1.0)
    w_tilde = 0.5 * (inside + outside) * nk
    nk_half = knn_membership(distances, max(k // 2, 1), eps, gain)
    mutual = nk_half * nk_half.T
    expanded = mutual @ w_tilde / mutual.sum(1, keepdim=True)
    return 0.5 * (expanded + expanded.T)


def margin_contrastive(sim: torch.Tensor, same: torch.Tensor, pos_margin: float, neg_margin: float) -> torch.Tensor:
    """``mean_active([m_pos - S]_+ on positives) + mean_active([S - m_neg]_+ on negatives)``."""
    total = sim.new_zeros(())
    for hinge in ((pos_margin - sim).clamp(min=0.0) * same, (sim - neg_margin).clamp(min=0.0) * (1.0 - same)):
        active = (hinge > 0).sum()
        if active > 0:
            total = total + hinge.sum() / active
    return total


@LOSSES.register("contextual")
class ContextualLoss(PairwiseLoss):
    """Contextual similarity loss + margin contrastive + similarity regulariser (Liao et al., ICML 2023).

    ``loss(embeddings, labels)`` follows the reference algorithm exactly (see the module docstring); embeddings
    must be L2-normalised and the batch should hold at least ``k`` samples of every class (a P x K batch with
    K >= k, e.g. :class:`metrank.samplers.PKBatchSampler`). Computed in at least float32 (autocast disabled).

    With ``ref_emb``/``ref_labels`` (e.g. image queries, text references) the contextual similarity is computed
    over the union of both sets - neighbourhoods span both - and every term is restricted to the
    query x reference block. ``indices_tuple`` is not supported: the loss uses every pair of the batch.

    Args:
        lam: weight of the contextual term. gamma: weight of the similarity regulariser; the margin contrastive
        term gets ``1 - lam - gamma``. k: neighbourhood size (query expansion uses k // 2). eps: neighbourhood
        slack on the squared distance. s_reg: target mean similarity. pos_margin / neg_margin: contrastive
        margins. gain: straight-through gradient of the k-NN step.
    """

    def __init__(
        self,
        lam: float = 0.4,
        gamma: float = 0.1,
        k: int = 4,
        eps: float = 0.05,
        s_reg: float = 0.25,
        pos_margin: float = 0.75,
        neg_margin: float = 0.6,
        gain: float = 10.0,
    ) -> None:
        super().__init__()
        if k < 2:
            raise InputError(f"k must be >= 2 (query expansion uses k // 2 neighbours), got {k}")
        if not (0.0 <= lam and 0.0 <= gamma and lam + gamma <= 1.0):
            raise InputError(f"need lam >= 0, gamma >= 0 and lam + gamma <= 1, got lam={lam}, gamma={gamma}")
        self.lam, self.gamma, self.k, self.eps, self.s_reg = lam, gamma, k, eps, s_reg
        self.pos_margin, self.neg_margin, self.gain = pos_margin, neg_margin, gain

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if indices_tuple is not None:
            raise InputError(
                "ContextualLoss uses every pair of the batch; indices_tuple (mined pairs) is not "
                "supported - drop the miner"
            )
        inputs = self.prepare_inputs(embeddings, labels, ref_emb, ref_labels)
        n = embeddings.shape[0]
        if not inputs.self_ref:  # union of the two sets; the loss keeps the query x reference block
            embeddings = torch.cat([embeddings, inputs.ref_emb.to(embeddings.dtype)])
            labels = torch.cat([labels, inputs.ref_labels.to(labels.device)])
        self._check_k(labels)
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(dtype)
            sim = x @ x.T
            same = (labels[:, None] == labels[None, :]).to(dtype)
            w = contextual_similarity(sim, self.k, self.eps, self.gain)
            off_diag = 1.0 - torch.eye(sim.shape[0], dtype=dtype, device=sim.device)
            ctx = (same * (1.0 - w).square() + (1.0 - same) * w.square()) * off_diag
            if not inputs.self_ref:
                sim, same, ctx = sim[:n, n:], same[:n, n:], ctx[:n, n:]
            loss_ctx = ctx.sum() / (sim.shape[0] * sim.shape[1])
            loss_con = margin_contrastive(sim, same, self.pos_margin, self.neg_margin)
            loss_reg = (sim.mean() - self.s_reg).square()
            return self.lam * loss_ctx + (1.0 - self.lam - self.gamma) * loss_con + self.gamma * loss_reg

    def _check_k(self, labels: torch.Tensor) -> None:
        classes, counts = labels.unique(return_counts=True)
        smallest = int(counts.min())
        if smallest < self.k:
            short = classes[counts < self.k][:5].tolist()
            raise InputError(
                f"ContextualLoss(k={self.k}) needs at least k samples of every class in the batch, but "
                f"class(es) {short} have only {smallest}; sample P x K batches with K >= {self.k} "
                f"(metrank.samplers.PKBatchSampler) or lower k"
            )
