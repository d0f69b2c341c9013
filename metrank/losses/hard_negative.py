"""Hinge losses on the hardest negatives for image–text matching: VSE++ max-violation and its soft form TAL (RDE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairwiseLoss, create_reducer, reduce_losses, zero_loss
from metrank.pairs import IndicesTuple, pair_masks, similarity_matrix


@LOSSES.register("hard_negative")
class HardNegativeLoss(PairwiseLoss):
    steps_done: torch.Tensor

    """VSE++ (Faghri et al., BMVC 2018) hinge ranking loss, one direction (anchors → references).

    For every positive pair ``(i, p)`` (same label; with a paired batch the diagonal):
    ``max_violation=True``: ``max_{n ∈ neg(i)} [m + S_in − S_ip]+`` (hardest negative only);
    ``max_violation=False``: ``Σ_{n ∈ neg(i)} [m + S_in − S_ip]+`` (sum of hinges, the VSE0 loss).
    Negatives are references with a different label, so duplicated ids are not false negatives.
    ``reduction``: ``"mean"`` over positive pairs (default), ``"sum"`` or ``"mean_active"``. The symmetric VSE++ loss of Faghri et al.
    (sum over both directions) is ``CrossModalLoss(HardNegativeLoss(reduction="sum"), combine="sum")``; the default
    ``CrossModalLoss(HardNegativeLoss())`` is the same value divided by 2B (mean per query).

    Warm-up: max-violation collapses from random init, so with ``warmup_steps=N`` the sum-of-hinges form is used
    until :meth:`step` has been called ``N`` times (call it once per optimiser step; ``CrossModalLoss.step``
    forwards it). The counter is a buffer, so it is saved in checkpoints.
    """

    def __init__(
        self, margin: float = 0.2, max_violation: bool = True, warmup_steps: int = 0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.margin = float(margin)
        self.max_violation = max_violation
        self.warmup_steps = int(warmup_steps)
        self.reducer = create_reducer(reduction)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def step(self) -> None:
        """Advance the warm-up schedule by one optimiser step."""
        self.steps_done += 1

    @property
    def uses_max_violation(self) -> bool:
        return self.max_violation and int(self.steps_done) >= self.warmup_steps

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
        a, p = (pos & neg.any(1, keepdim=True)).nonzero(as_tuple=True)
        if a.numel() == 0:
            return zero_loss(
                inputs.embeddings, inputs.ref_emb, reason="no positive pair with at least one negative in the batch"
            )
        sim = similarity_matrix(inputs.embeddings, inputs.ref_emb)
        s_ap = sim[a, p]
        if self.uses_max_violation:
            hardest = sim.masked_fill(~neg, float("-inf")).amax(1)
            losses = F.relu(self.margin + hardest[a] - s_ap)
        else:
            losses = (F.relu(self.margin + sim[a] - s_ap[:, None]) * neg[a]).sum(1)
        return reduce_losses(losses, self.reducer)


@LOSSES.register("tal")
class TripletAlignmentLoss(PairwiseLoss):
    """Triplet Alignment Loss, TAL (Qin et al., CVPR 2024, "Noisy-Correspondence Learning for Text-to-Image Person
    Re-identification", RDE), one direction.

    Per anchor ``i``: ``[−Σ_{p ∈ pos(i)} α_ip S_ip + τ·log Σ_{n ∈ neg(i)} exp(S_in / τ) + m]+`` with
    ``α_i· = softmax_{pos(i)}(S_i· / τ)`` detached (RDE's weighting of multiple positives); the log-sum-exp is a
    smooth upper bound of the hardest negative, so TAL relaxes VSE++'s max-violation. τ = 0.015, m = 0.1.
    Anchors lacking a positive or a negative are skipped. ``reduction``: ``"mean"`` over anchors, ``"sum"`` or ``"mean_active"``;
    RDE's ``compute_TAL`` (summed over both directions) is ``CrossModalLoss(TripletAlignmentLoss(reduction="sum"),
    combine="sum")``.
    """

    def __init__(self, tau: float = 0.015, margin: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        if tau <= 0:
            raise InputError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.margin = float(margin)
        self.reducer = create_reducer(reduction)

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
        rows = (pos.any(1) & neg.any(1)).nonzero().flatten()
        if rows.numel() == 0:
            return zero_loss(
                inputs.embeddings, inputs.ref_emb, reason="no anchor with both a positive and a negative in the batch"
            )
        sim = similarity_matrix(inputs.embeddings[rows], inputs.ref_emb)
        pos, neg = pos[rows], neg[rows]
        scaled = sim / self.tau
        pos_scaled = scaled.detach().masked_fill(~pos, float("-inf"))
        alpha = (pos_scaled - torch.logsumexp(pos_scaled, dim=1, keepdim=True)).exp()  # softmax over positives
        positive = (alpha * sim).sum(1)
        negative = self.tau * torch.logsumexp(scaled.masked_fill(~neg, float("-inf")), dim=1)
        return reduce_losses(F.relu(negative - positive + self.margin), self.reducer)
