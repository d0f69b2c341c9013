"""SigLIP's sigmoid loss against open_clip's SigLipLoss (value and gradient) and a hand-written loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from metrank.losses import LOSSES, SigLipLoss, create_loss, is_paired

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_value_and_gradient_equal_open_clip():
    img, txt = unit(9, 6, 0).requires_grad_(True), unit(9, 6, 1).requires_grad_(True)
    ours = SigLipLoss(scale=7.0, bias=-3.0).double()
    value = ours(img, txt, torch.arange(9))
    value.backward()
    grads = img.grad.clone(), txt.grad.clone(), ours.logit_scale.grad.clone(), ours.logit_bias.grad.clone()

    img2, txt2 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    t_prime = ours.logit_scale.detach().clone().requires_grad_(True)  # log 7, rounded in float32 as initialised
    bias = ours.logit_bias.detach().clone().requires_grad_(True)
    reference = OpenClipSigLipLoss()(img2, txt2, t_prime.exp(), bias)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    for mine, theirs in zip(grads, (img2.grad, txt2.grad, t_prime.grad, bias.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_loop_reference_with_shared_ids():
    img, txt = unit(7, 5, 2), unit(7, 5, 3)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # shared ids are positives of each other
    loss = SigLipLoss(scale=5.0, bias=-2.0, learnable=False).double()
    total = 0.0
    for i in range(7):
        for j in range(7):
            y = 1.0 if ids[i] == ids[j] else -1.0
            z = loss.scale.item() * float(img[i] @ txt[j]) - 2.0
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    assert loss(img, txt, ids).item() == pytest.approx(total / 7, rel=1e-12)
    assert list(loss.parameters()) == []


def test_registered_as_paired_and_defaults():
    assert LOSSES.get("siglip") is SigLipLoss and is_paired("siglip")
    loss = create_loss("siglip")
    assert loss.scale.item() == pytest.approx(10.0) and loss.logit_bias.item() == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="scale"):
        SigLipLoss(scale=0)
    with pytest.raises(ValueError, match="rows"):
        loss(unit(4, 3, 4).float(), unit(5, 3, 5).float(), torch.arange(4))


def test_gradcheck_float64():
    ids = torch.tensor([0, 1, 1, 2, 3])
    loss = SigLipLoss(scale=4.0, bias=-1.0).double()

    def f(a, b):
        return loss(F.normalize(a, dim=1), F.normalize(b, dim=1), ids)

    a, b = unit(5, 4, 6).requires_grad_(True), unit(5, 4, 7).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-6)
