"""The two loss contracts, the loss registry, reduction and the documented zero-loss path.

Every loss declares its calling convention by its base class:

- :class:`PairwiseLoss` — pytorch-metric-learning's form ``loss(embeddings, labels, indices_tuple=None,
  ref_emb=None, ref_labels=None)``: anchors from ``embeddings``, positives/negatives from ``ref_emb``; one direction.
  Used as is for class-label metric learning; ``CrossModalLoss(loss)`` makes any of them (and any PML loss) a
  symmetric image↔text loss.
- :class:`PairedLoss` — image–text form ``loss(image_emb, text_emb, ids, **extra)``: row ``i`` of both is a
  matching pair, ``ids[i]`` its image id (rows sharing an id are positives of each other); ``extra`` carries what a
  loss needs beyond the embeddings (raw inputs for a CPRD teacher, caption ids).

Input conventions (PML reference sets, label masks, distances) live in :mod:`metrank.pairs`.
"""

from __future__ import annotations

import warnings

import torch
from pytorch_metric_learning import reducers as pml_reducers

from metrank.pairs import ChecksInputs, IndicesTuple
from metrank.registry import Registry
from metrank.validation import check_choice

LOSSES: Registry[torch.nn.Module] = Registry("loss")
REDUCTIONS = ("mean_active", "mean", "sum")


class NoValidTupleWarning(UserWarning):
    """A batch had no positive pair / valid triplet or quadruplet, so the loss is a graph-attached zero."""


class PairwiseLoss(ChecksInputs):
    """A one-directional loss in pytorch-metric-learning's calling convention (see the module docstring)."""

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class PairedLoss(ChecksInputs):
    """A loss over a paired image–text batch: ``forward(image_emb, text_emb, ids)``; a loss that needs more (the raw
    inputs for a teacher, caption ids) takes them as extra keyword arguments."""

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> None:
        """Advance a schedule (e.g. a warm-up) by one optimiser step; the trainer calls it after each step."""


_PML_REDUCERS = {
    "mean_active": pml_reducers.AvgNonZeroReducer,
    "mean": pml_reducers.MeanReducer,
    "sum": pml_reducers.SumReducer,
}


def create_reducer(reduction: str) -> pml_reducers.BaseReducer:
    """PML reducer for ``"mean_active"`` (mean over losses > 0), ``"mean"`` or ``"sum"``."""
    return _PML_REDUCERS[check_choice(reduction, REDUCTIONS, "reduction")]()


def reduce_losses(losses: torch.Tensor, reducer: pml_reducers.BaseReducer) -> torch.Tensor:
    """Reduce a non-empty 1-D tensor of per-element losses; an all-zero ``mean_active`` stays graph-attached."""
    indices = torch.arange(losses.shape[0], device=losses.device)
    return reducer({"loss": {"losses": losses, "indices": indices, "reduction_type": "element"}}, losses, None)


def zero_loss(*tensors: torch.Tensor, reason: str) -> torch.Tensor:
    """The documented empty-batch result: ``0.0`` attached to every input's graph, plus a ``NoValidTupleWarning``.

    Attaching to all inputs (including gathered reference embeddings) keeps DDP collectives in step: every rank
    still runs the backward of the gather.
    """
    warnings.warn(f"{reason}; returning a zero loss for this batch", NoValidTupleWarning, stacklevel=3)
    return torch.stack([t.sum() * 0 for t in tensors]).sum()
