"""QuadrupletLoss and CDMLMR CrossModalQuadrupletLoss vs hand-computed and brute-force references."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrank.losses import CrossModalQuadrupletLoss, NoValidTupleWarning, QuadrupletLoss, create_loss

# Six unit vectors, classes 0,0,1,1,2,2. Squared distances 2 − 2S:
# 01 .8, 02 2, 03 2, 04 2, 05 2, 12 .4, 13 1.04, 14 2, 15 .72, 23 .8, 24 2, 25 .4, 34 .4, 35 .08, 45 .8
HAND_X = torch.tensor(
    [[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0.6, 0.8], [0, 0, 1], [0, 0.8, 0.6]], dtype=torch.float64
)
HAND_Y = torch.tensor([0, 0, 1, 1, 2, 2])


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def brute_force_quadruplet(x, labels, ref, ref_labels, self_ref, margins=(1.0, 0.5), adaptive_weights=None):
    """Loop over every (a, p, n, (l, k)) quadruplet; per anchor keep the batch-hard choice."""
    d2 = ((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    n_a, n_r = d2.shape
    pos = [[j for j in range(n_r) if labels[a] == ref_labels[j] and not (self_ref and a == j)] for a in range(n_a)]
    neg = [[j for j in range(n_r) if labels[a] != ref_labels[j]] for a in range(n_a)]
    if adaptive_weights:
        gap = max(
            np.mean([d2[a, j] for a in range(n_a) for j in neg[a]])
            - np.mean([d2[a, j] for a in range(n_a) for j in pos[a]]),
            0,
        )
        margins = (adaptive_weights[0] * gap, adaptive_weights[1] * gap)
    losses = []
    for a in range(n_a):
        free = [
            d2[l, k]
            for l, k in itertools.product(range(n_a), range(n_r))
            if labels[l] != ref_labels[k] and labels[a] not in (labels[l], ref_labels[k])
        ]
        if not pos[a] or not neg[a] or not free:
            continue
        g_ap, g_an = max(d2[a, pos[a]]), min(d2[a, neg[a]])
        losses.append(max(g_ap - g_an + margins[0], 0) + max(g_ap - min(free) + margins[1], 0))
    return np.mean(losses)


def test_hand_computed():
    # per anchor [g_ap − g_an + 1]+ + [g_ap − g_lk + .5]+ with g_ap = .8 everywhere:
    # a0: g_an 2, g_lk .08 → 0 + 1.22   a1: .4, .08 → 1.4 + 1.22   a2: .4, .72 → 1.4 + .58
    # a3: .08, .72 → 1.72 + .58        a4: .4, .4 → 1.4 + .9       a5: .08, .4 → 1.72 + .9
    want = (1.22 + 2.62 + 1.98 + 2.30 + 2.30 + 2.62) / 6
    assert QuadrupletLoss()(HAND_X, HAND_Y).item() == pytest.approx(want)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_brute_force(adaptive):
    x, labels = unit(14, 5, 1), torch.arange(14) % 4
    loss = QuadrupletLoss(adaptive=adaptive)
    want = brute_force_quadruplet(
        x.numpy(), labels.tolist(), x.numpy(), labels.tolist(), True, adaptive_weights=(1.0, 0.5) if adaptive else None
    )
    assert loss(x, labels).item() == pytest.approx(want, rel=1e-10)


def test_cross_modal_reference_matches_brute_force():
    x, ref = unit(9, 4, 2), unit(11, 4, 3)
    labels, ref_labels = torch.arange(9) % 3, torch.arange(11) % 4
    want = brute_force_quadruplet(x.numpy(), labels.tolist(), ref.numpy(), ref_labels.tolist(), False)
    assert QuadrupletLoss()(x, labels, ref_emb=ref, ref_labels=ref_labels).item() == pytest.approx(want, rel=1e-10)


def brute_force_sscon(image, text, labels, margin):
    """L_sscon as documented: ½d² on similar cross-modal pairs, ½[m − d]+² on dissimilar ones, mean over pairs and
    over both directions."""
    total = 0.0
    for a, b in ((image, text), (text, image)):
        terms = []
        for i, j in itertools.product(range(len(a)), range(len(b))):
            d = np.linalg.norm(a[i] - b[j])
            similar = i == j or (labels[i] >= 0 and labels[j] >= 0 and labels[i] == labels[j])
            terms.append(0.5 * d * d if similar else 0.5 * max(margin - d, 0) ** 2)
        total += 0.5 * np.mean(terms)
    return total


def test_cdmlmr_matches_reference():
    image, text = unit(10, 4, 4), unit(10, 4, 5)
    labels = torch.tensor([0, 1, 2, 0, -1, 1, 2, -1, -1, 0])
    keep = (labels >= 0).numpy()
    lab = labels.numpy()
    quad = 0.5 * (
        brute_force_quadruplet(image.numpy()[keep], lab[keep], text.numpy()[keep], lab[keep], False)
        + brute_force_quadruplet(text.numpy()[keep], lab[keep], image.numpy()[keep], lab[keep], False)
    )
    sscon = brute_force_sscon(image.numpy(), text.numpy(), lab, 1.0)
    got = CrossModalQuadrupletLoss(lam=0.7)(image, text, labels)
    assert got.item() == pytest.approx(quad + 0.7 * sscon, rel=1e-10)


def test_cdmlmr_all_unlabelled_warns_and_keeps_contrastive_term():
    image, text = unit(6, 4, 6), unit(6, 4, 7)
    labels = torch.full((6,), -1)
    with pytest.warns(NoValidTupleWarning, match="no labelled pair"):
        got = CrossModalQuadrupletLoss(lam=1.0)(image, text, labels)
    assert got.item() == pytest.approx(brute_force_sscon(image.numpy(), text.numpy(), labels.numpy(), 1.0))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradcheck_float64(adaptive):
    x = unit(9, 4, 8).requires_grad_()
    labels = torch.arange(9) % 3
    assert torch.autograd.gradcheck(lambda e: QuadrupletLoss(adaptive=adaptive)(e, labels), (x,))


def test_gradcheck_cdmlmr():
    image, text = unit(7, 3, 9).requires_grad_(), unit(7, 3, 10).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, -1, 1, 2])
    assert torch.autograd.gradcheck(lambda a, b: CrossModalQuadrupletLoss()(a, b, labels), (image, text))


def test_permutation_invariance():
    x, labels = unit(24, 6, 11), torch.arange(24) % 5
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(12))
    for loss in (QuadrupletLoss(), QuadrupletLoss(adaptive=True)):
        assert loss(x[perm], labels[perm]).item() == pytest.approx(loss(x, labels).item(), rel=1e-10)
    image, text, lab = unit(12, 4, 13), unit(12, 4, 14), torch.tensor([0, 1, 2, -1] * 3)
    cdmlmr, perm = CrossModalQuadrupletLoss(), torch.randperm(12, generator=torch.Generator().manual_seed(15))
    assert cdmlmr(image[perm], text[perm], lab[perm]).item() == pytest.approx(
        cdmlmr(image, text, lab).item(), rel=1e-10
    )


def test_zero_when_margins_met():
    x = torch.eye(4, dtype=torch.float64).repeat_interleave(2, 0).requires_grad_()
    value = QuadrupletLoss()(x, torch.arange(4).repeat_interleave(2))  # g_ap² = 0, g_an² = g_lk² = 2 > 1, .5
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_two_classes_have_no_quadruplet():
    x = unit(6, 4, 15).requires_grad_()
    with pytest.warns(NoValidTupleWarning, match=">= 3 classes"):
        value = create_loss("quadruplet")(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    value.backward()
    assert value.item() == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="margin1"):
        QuadrupletLoss(margin1=0.2, margin2=0.5)
    with pytest.raises(ValueError, match="L2-normalised"):
        QuadrupletLoss()(2 * unit(6, 4, 16), torch.arange(6) % 3)
    with pytest.raises(ValueError, match="rows but text_emb"):
        CrossModalQuadrupletLoss()(unit(6, 4, 17), unit(5, 4, 18), torch.arange(6))
