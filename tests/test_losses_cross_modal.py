"""CrossModalLoss wraps any pairwise loss, pytorch-metric-learning's included, into the symmetric image↔text form."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from metrank.losses import LOSSES, CrossModalLoss, InfoNCELoss, PairedLoss, PairwiseLoss, TripletMarginLoss, is_paired


def paired_batch(n: int = 12, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    return image, text, torch.arange(n)


def test_wrapped_pml_ntxent_equals_clip_loss():
    """PML reads ``ref_labels is labels`` as "the reference set is the anchor set" and drops the true pairs;
    CrossModalLoss must hand it a separate id tensor so NTXent is CLIP's loss, not 0."""
    image, text, ids = paired_batch()
    wrapped = CrossModalLoss(pml_losses.NTXentLoss(temperature=0.07))(image, text, ids)
    ours = CrossModalLoss(InfoNCELoss(temperature=0.07, learnable=False))(image, text, ids)
    logits = image @ text.T / 0.07
    clip = 0.5 * (F.cross_entropy(logits, ids) + F.cross_entropy(logits.T, ids))
    assert wrapped.item() > 0
    torch.testing.assert_close(wrapped, clip, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, clip, rtol=1e-6, atol=1e-8)  # float32 logit-scale buffer


def test_wrapped_pml_triplet_equals_metrank_triplet():
    image, text, ids = paired_batch(seed=1)
    pml = pml_losses.TripletMarginLoss(margin=0.5)
    ours = TripletMarginLoss(margin=0.5, reduction="mean_active")
    wrapped, reference = CrossModalLoss(pml)(image, text, ids), CrossModalLoss(ours)(image, text, ids)
    assert wrapped.item() > 0
    torch.testing.assert_close(wrapped, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_declares_one_contract(name):
    entry = LOSSES.get(name)
    assert issubclass(entry, PairwiseLoss) != issubclass(entry, PairedLoss)
    assert is_paired(name) == issubclass(entry, PairedLoss)


def test_value_checks_run_once_then_under_debug():
    from metrank.validation import set_debug_checks

    loss = InfoNCELoss()
    image, text, ids = paired_batch()
    bad = image.clone()
    bad[0] = 2 * bad[0]
    with pytest.raises(ValueError, match="L2-normalised"):
        loss(bad, ids, ref_emb=text, ref_labels=ids)  # first call reads the values
    loss(image, ids, ref_emb=text, ref_labels=ids)
    loss(bad, ids, ref_emb=text, ref_labels=ids)  # later calls check shapes only: no device sync per step
    set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match="L2-normalised"):
            loss(bad, ids, ref_emb=text, ref_labels=ids)
    finally:
        set_debug_checks(False)
