"""InfoNCE/CLIP and multiple negatives ranking vs hand-computed values, open_clip, PML NTXent, sentence-transformers."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pytorch_metric_learning.losses import NTXentLoss

from metrank.losses import (
    CrossModalLoss,
    HardNegativeNCELoss,
    InfoNCELoss,
    MultipleNegativesRankingLoss,
    NoValidTupleWarning,
    create_loss,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMultipleNegatives


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_hand_computed_clip():
    # S = [[.6, .8], [.8, .6]], s = 10: each row/column CE = −log(e^6 / (e^6 + e^8)) = log(1 + e^2)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    loss = CrossModalLoss(InfoNCELoss(temperature=0.1, learnable=False))
    assert loss(image, text, torch.arange(2)).item() == pytest.approx(math.log1p(math.exp(2)))


def test_equals_open_clip_and_textbook_cross_entropy():
    image, text = unit(16, 8, 1, torch.float32), unit(16, 8, 2, torch.float32)
    infonce = InfoNCELoss()
    ours = CrossModalLoss(infonce)(image, text, torch.arange(16))
    assert ours.item() == pytest.approx(ClipLoss()(image, text, infonce.scale).item(), rel=1e-6)
    logits = infonce.scale * image @ text.T
    textbook = 0.5 * (F.cross_entropy(logits, torch.arange(16)) + F.cross_entropy(logits.T, torch.arange(16)))
    assert ours.item() == pytest.approx(textbook.item(), rel=1e-6)
    assert infonce.scale.item() == pytest.approx(1 / 0.07)


def test_learnable_scale_is_capped_at_100():
    image, text = unit(8, 4, 3), unit(8, 4, 4)
    infonce = InfoNCELoss()
    CrossModalLoss(infonce)(image, text, torch.arange(8)).backward()
    assert infonce.logit_scale.grad.abs().item() > 0
    infonce.logit_scale.data.fill_(math.log(200.0))
    infonce.logit_scale.grad = None
    CrossModalLoss(infonce)(image, text, torch.arange(8)).backward()
    assert infonce.scale.item() == pytest.approx(100.0) and infonce.logit_scale.grad.item() == 0.0
    assert list(InfoNCELoss(learnable=False).parameters()) == []


def test_duplicate_ids_are_not_false_negatives():
    image, text = unit(7, 5, 5), unit(7, 5, 6)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    logits = (10.0 * image @ text.T).tolist()
    total, pairs = 0.0, 0
    for i in range(7):
        negatives = [math.exp(logits[i][j]) for j in range(7) if ids[j] != ids[i]]
        for p in (j for j in range(7) if ids[j] == ids[i]):
            total -= math.log(math.exp(logits[i][p]) / (math.exp(logits[i][p]) + sum(negatives)))
            pairs += 1
    got = InfoNCELoss(0.1, learnable=False)(image, ids, ref_emb=text, ref_labels=ids)
    assert got.item() == pytest.approx(total / pairs, rel=1e-10)


def test_equals_pml_ntxent_at_fixed_temperature():
    x, labels = unit(32, 8, 7, torch.float32), torch.arange(32) % 10
    assert InfoNCELoss(0.1, learnable=False)(x, labels).item() == pytest.approx(
        NTXentLoss(0.1)(x, labels).item(), rel=1e-5
    )
    ref, ref_labels = unit(20, 8, 8, torch.float32), torch.arange(20) % 10
    want = NTXentLoss(0.1)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    got = InfoNCELoss(0.1, learnable=False)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("with_hard_negatives", [False, True])
def test_mnr_equals_sentence_transformers(with_hard_negatives):
    query, doc, hard = (unit(12, 8, s, torch.float32) for s in (9, 10, 11))
    st = STMultipleNegatives(model=None, scale=20.0)  # compute_loss_from_embeddings never touches the model
    want = st.compute_loss_from_embeddings([query, doc, hard] if with_hard_negatives else [query, doc], None)
    ids = torch.arange(12)
    got = MultipleNegativesRankingLoss()(
        query, ids, ref_emb=doc, ref_labels=ids, hard_negatives=hard if with_hard_negatives else None
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_mnr_hand_computed():
    # one query (1, 0), positive (.6, .8), hard negative (.8, .6): −log(e^12 / (e^12 + e^16)) = log(1 + e^4)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = MultipleNegativesRankingLoss()(
        q,
        torch.tensor([0]),
        ref_emb=torch.tensor([[0.6, 0.8]], dtype=torch.float64),
        ref_labels=torch.tensor([0]),
        hard_negatives=torch.tensor([[0.8, 0.6]], dtype=torch.float64),
    )
    assert got.item() == pytest.approx(math.log1p(math.exp(4)))


def test_gradcheck_float64():
    image, text = unit(6, 4, 12).requires_grad_(), unit(6, 4, 13).requires_grad_()
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    infonce = CrossModalLoss(InfoNCELoss(0.2, learnable=False))
    assert torch.autograd.gradcheck(lambda a, b: infonce(a, b, ids), (image, text))
    hard = unit(3, 4, 14).requires_grad_()
    mnr = MultipleNegativesRankingLoss(scale=5.0)
    assert torch.autograd.gradcheck(
        lambda a, b, h: mnr(a, ids, ref_emb=b, ref_labels=ids, hard_negatives=h), (image, text, hard)
    )


def test_permutation_invariance():
    image, text, ids = unit(20, 8, 15), unit(20, 8, 16), torch.arange(20) // 3
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(17))
    for loss in (CrossModalLoss(InfoNCELoss()), CrossModalLoss(MultipleNegativesRankingLoss())):
        assert loss(image[perm], text[perm], ids[perm]).item() == pytest.approx(
            loss(image, text, ids).item(), rel=1e-10
        )


def test_no_positive_pair_warns_zero():
    x = unit(5, 4, 18).requires_grad_()
    for name in ("infonce", "mnr"):
        with pytest.warns(NoValidTupleWarning, match="no positive pair"):
            value = create_loss(name)(x, torch.arange(5))
        value.backward()
        assert value.item() == 0.0


def test_bad_input():
    x = unit(5, 4, 19)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="length 4 but there are 5"):
        InfoNCELoss()(x, torch.arange(4))
    with pytest.raises(ValueError, match="dimension 3 but 4"):
        MultipleNegativesRankingLoss()(
            x, torch.arange(5), ref_emb=x, ref_labels=torch.arange(5), hard_negatives=unit(2, 3, 20)
        )
    with pytest.raises(ValueError, match="NaN"):
        CrossModalLoss(InfoNCELoss())(x, torch.full_like(x, float("nan")), torch.arange(5))


@pytest.mark.parametrize("seed", [0, 1])
def test_hn_nce_at_beta_zero_is_infonce(seed):
    img, txt = unit(10, 6, 40 + seed).requires_grad_(True), unit(10, 6, 50 + seed).requires_grad_(True)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])
    hn = CrossModalLoss(HardNegativeNCELoss(alpha=1.0, beta=0.0)).double()
    base = CrossModalLoss(InfoNCELoss()).double()
    value, expected = hn(img, txt, ids), base(img, txt, ids)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    g_hn = torch.autograd.grad(value, (img, txt, hn.loss.logit_scale))
    g_base = torch.autograd.grad(expected, (img, txt, base.loss.logit_scale))
    for a, b in zip(g_hn, g_base):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.5), (0.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_hn_nce_loop_reference(alpha, beta):
    img, txt = unit(8, 5, 60), unit(8, 5, 61)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6])
    loss = HardNegativeNCELoss(alpha=alpha, beta=beta, temperature=0.2, learnable=False).double()
    value = loss(img, ids, ref_emb=txt, ref_labels=ids.clone())
    z = (loss.scale * img @ txt.T).tolist()  # scale = 1 / 0.2 (rounded in float32 like the parameter)
    terms = []
    for i in range(8):
        negs = [j for j in range(8) if ids[j] != ids[i]]
        weight_sum = sum(math.exp(beta * z[i][j]) for j in negs)
        weighted = sum(len(negs) * math.exp(beta * z[i][j]) / weight_sum * math.exp(z[i][j]) for j in negs)
        for p in (j for j in range(8) if ids[j] == ids[i]):
            terms.append(-math.log(math.exp(z[i][p]) / (alpha * math.exp(z[i][p]) + weighted)))
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_hn_nce_weights_harder_negatives_more():
    img, txt = unit(12, 6, 70), unit(12, 6, 71)
    ids = torch.arange(12)
    values = [
        HardNegativeNCELoss(beta=b, learnable=False).double()(img, ids, ref_emb=txt, ref_labels=ids.clone()).item()
        for b in (0.0, 0.5, 1.0)
    ]
    assert values[0] < values[1] < values[2]  # reweighting towards the hardest raises the denominator
    assert create_loss("hn_nce", beta=0.3).beta == 0.3
    with pytest.raises(ValueError, match="alpha and beta"):
        HardNegativeNCELoss(beta=-1)
