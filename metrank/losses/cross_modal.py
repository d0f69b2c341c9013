"""Symmetric image↔text form of any PML-convention loss, with global negatives under DDP and an optional
cross-batch memory of past pairs (XBM, :mod:`metrank.losses.memory`)."""

from __future__ import annotations

import torch
from torch import nn

from metrank.distributed import all_gather_no_grad, all_gather_with_grad
from metrank.errors import InputError
from metrank.losses.base import PairedLoss
from metrank.losses.memory import MemoryQueue
from metrank.validation import check_choice


def gather_pairs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' embeddings (with gradient back to the owning rank) and ids; identity without DDP.

    The reference ids are always a tensor other than ``ids``: pytorch-metric-learning reads ``ref_labels is labels``
    as "the reference set is the anchor set" and would then drop the diagonal, i.e. the true image–text pairs.
    """
    ref_ids = all_gather_no_grad(ids)
    if ref_ids is ids:
        ref_ids = ids.clone()
    return all_gather_with_grad(image_emb), all_gather_with_grad(text_emb), ref_ids


def symmetric_loss(
    loss: nn.Module,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ids: torch.Tensor,
    image_ref: torch.Tensor,
    text_ref: torch.Tensor,
    ref_ids: torch.Tensor,
    combine: str = "mean",
) -> torch.Tensor:
    """``loss(img → text_ref) ⊕ loss(text → image_ref)`` with ``⊕`` = half-sum (``"mean"``) or sum."""
    i2t = loss(image_emb, ids, ref_emb=text_ref, ref_labels=ref_ids)
    t2i = loss(text_emb, ids, ref_emb=image_ref, ref_labels=ref_ids)
    return 0.5 * (i2t + t2i) if combine == "mean" else i2t + t2i


class CrossModalLoss(PairedLoss):
    """Turn a one-directional PML-convention loss into the paired symmetric image↔text loss.

    ``forward(image_emb, text_emb, ids) = ½[loss(img, ids, ref_emb=txt_g, ref_labels=ids_g)
    + loss(txt, ids, ref_emb=img_g, ref_labels=ids_g)]`` (``combine="sum"`` drops the ½). Rows sharing an id (several
    captions of one image) are positives of each other, never false negatives. Under ``torch.distributed`` the
    reference side ``*_g`` is every rank's batch (:func:`metrank.distributed.all_gather_with_grad`) while anchors stay
    local ("local loss" form): when every rank has the same number of positive pairs (e.g. equal batches of unique
    ids) and the loss is mean-reduced, the mean of the rank losses is the loss of the concatenated global batch and
    DDP's gradient averaging yields its gradient (tests/test_ddp.py).

    For CLIP's InfoNCE, ``CrossModalLoss(InfoNCELoss())`` is exactly ``½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)]``; for VSE++,
    ``CrossModalLoss(HardNegativeLoss(reduction="sum"), combine="sum")`` is exactly Faghri et al.'s loss.

    ``memory_size > 0`` adds a cross-batch memory (XBM): the references are the (gathered) batch followed by the
    image/text embeddings and ids of up to ``memory_size`` earlier pairs, so a hinge loss mines its hardest negative
    beyond the batch (queued rows sharing an anchor's id count as its positives). The batch joins the queue after
    the loss is computed (in training mode); every rank holds the same queue.
    """

    def __init__(self, loss: nn.Module, combine: str = "mean", memory_size: int = 0) -> None:
        super().__init__()
        self.loss = loss
        self.combine = check_choice(combine, ("mean", "sum"), "combine")
        if memory_size < 0:
            raise InputError(f"memory_size must be >= 0 (0 = no memory), got {memory_size}")
        self.memory = MemoryQueue(memory_size) if memory_size else None

    def step(self) -> None:
        """Forward a schedule step (e.g. :class:`HardNegativeLoss` warm-up) to the wrapped loss, if it has one."""
        step = getattr(self.loss, "step", None)
        if callable(step):
            step()

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.check_pairs(image_emb, text_emb, ids)
        image_ref, text_ref, ref_ids = gather_pairs(image_emb, text_emb, ids)
        if self.memory is not None:
            image_ref = torch.cat([image_ref, self.memory.get("image", image_emb).to(image_emb)])
            text_ref = torch.cat([text_ref, self.memory.get("text", text_emb).to(text_emb)])
            ref_ids = torch.cat([ref_ids, self.memory.get("ids", ids).to(ids.device)])
        value = symmetric_loss(self.loss, image_emb, text_emb, ids, image_ref, text_ref, ref_ids, self.combine)
        if self.memory is not None and self.training:
            self.memory.push(image=image_emb, text=text_emb, ids=ids)
        return value
