"""SigLIP's pairwise sigmoid loss for image–text pairs (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023).

Every (image, text) pair of the batch is an independent binary classification:
``L = −(1/B) Σ_i Σ_j log σ( y_ij · (t · S_ij + b) )`` with ``y_ij = +1`` for matching pairs and ``−1`` otherwise,
``S = I·Tᵀ`` the cosine similarities, a learnable scale ``t = exp(t')`` (init 10) and bias ``b`` (init −10, so the
many negatives start with a small loss). No softmax couples the pairs, so the loss needs no global normalisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metrank.distributed import all_gather_no_grad, all_gather_with_grad
from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairedLoss
from metrank.pairs import similarity_matrix


@LOSSES.register("siglip")
class SigLipLoss(PairedLoss):
    """SigLIP sigmoid loss, paired form ``loss(image_emb, text_emb, ids)`` (formula in the module doc).

    Matches open_clip's ``SigLipLoss`` given ``logit_scale = exp(t')`` and ``logit_bias = b`` (value and gradient,
    tests/test_losses_sigmoid.py). Unlike open_clip, rows sharing an id (several captions of one image) are
    positives of each other (``y = +1``), not negatives. Under ``torch.distributed`` the local images meet every
    rank's texts (gathered with gradient) and the sum is divided by the local batch size, so the mean of the rank
    losses is the loss of the global batch (open_clip's neighbour exchange computes the same sum). The scale is
    ``exp(t')`` capped at ``max_scale``; ``learnable=False`` makes ``t'`` and ``b`` fixed buffers.
    """

    def __init__(
        self, scale: float = 10.0, bias: float = -10.0, learnable: bool = True, max_scale: float = 100.0
    ) -> None:
        super().__init__()
        if scale <= 0 or max_scale <= 0:
            raise InputError(f"scale and max_scale must be > 0, got {scale} and {max_scale}")
        init_scale, init_bias = torch.tensor(math.log(scale)), torch.tensor(float(bias))
        if learnable:
            self.logit_scale, self.logit_bias = nn.Parameter(init_scale), nn.Parameter(init_bias)
        else:
            self.register_buffer("logit_scale", init_scale)
            self.register_buffer("logit_bias", init_bias)
        self.max_scale = float(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor, **extra: Any) -> torch.Tensor:
        self.check_pairs(image_emb, text_emb, ids)
        text_ref, ref_ids = all_gather_with_grad(text_emb), all_gather_no_grad(ids.to(image_emb.device))
        logits = self.scale.to(image_emb.dtype) * similarity_matrix(image_emb, text_ref) + self.logit_bias
        signs = (ids.to(image_emb.device)[:, None] == ref_ids[None, :]).to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() / image_emb.shape[0]
