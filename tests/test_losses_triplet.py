"""TripletMarginLoss: hand-computed case, PML parity, gradcheck, permutation invariance, zero and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from metrank.losses import NoValidTupleWarning, TripletMarginLoss, create_loss

# Four unit vectors, classes {0, 1} and {2, 3}; cosine similarities S01 = 0.6, S02 = 0.8, S03 = 0, S12 = 0.96,
# S13 = 0.8, S23 = 0.6.
HAND_X = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
HAND_Y = torch.tensor([0, 0, 1, 1])


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_hand_computed_cosine():
    # Hinges [S_an − S_ap + 0.2]+ of the 8 triplets: (0,1,2) 0.4, (0,1,3) 0, (1,0,2) 0.56, (1,0,3) 0.4,
    # (2,3,0) 0.4, (2,3,1) 0.56, (3,2,0) 0, (3,2,1) 0.4.
    assert TripletMarginLoss(0.2, "cosine")(HAND_X, HAND_Y).item() == pytest.approx(2.72 / 6)
    assert TripletMarginLoss(0.2, "cosine", reduction="mean")(HAND_X, HAND_Y).item() == pytest.approx(2.72 / 8)
    assert TripletMarginLoss(0.2, "cosine", reduction="sum")(HAND_X, HAND_Y).item() == pytest.approx(2.72)
    # batch-hard: anchor 0 → (p 1, n 2) 0.4, anchor 1 → (0, 2) 0.56, anchor 2 → (3, 1) 0.56, anchor 3 → (2, 1) 0.4
    batch_hard = TripletMarginLoss(0.2, "cosine", miner="batch_hard")(HAND_X, HAND_Y)
    assert batch_hard.item() == pytest.approx((0.4 + 0.56 + 0.56 + 0.4) / 4)


def test_hand_computed_euclidean():
    # d = sqrt(2 − 2S): d01 = sqrt(0.8), d02 = sqrt(0.4), d03 = sqrt(2), d12 = sqrt(0.08), d13 = sqrt(0.4), d23 = sqrt(0.8)
    s = math.sqrt
    hinges = [
        s(0.8) - s(0.4),
        s(0.8) - s(2),
        s(0.8) - s(0.08),
        s(0.8) - s(0.4),
        s(0.8) - s(0.4),
        s(0.8) - s(0.08),
        s(0.8) - s(2),
        s(0.8) - s(0.4),
    ]
    active = [h + 0.2 for h in hinges if h + 0.2 > 0]
    assert TripletMarginLoss(0.2)(HAND_X, HAND_Y).item() == pytest.approx(sum(active) / len(active))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind,name", [("semihard", "semi_hard"), ("hard", "hard"), ("all", "all")])
def test_equals_pml_with_triplet_margin_miner(kind, name, distance):
    x, labels = unit(48, 16, 1, torch.float32), torch.randint(0, 8, (48,), generator=torch.Generator().manual_seed(2))
    pml_distance = LpDistance() if distance == "euclidean" else CosineSimilarity()
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind, distance=pml_distance)
    want = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distance)(x, labels, miner(x, labels))
    got = TripletMarginLoss(0.2, distance, miner=name)(x, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_equals_pml_batch_hard_and_no_miner():
    x, labels = unit(64, 16, 3, torch.float32), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(4))
    pml = pml_losses.TripletMarginLoss(margin=0.2)
    assert TripletMarginLoss(0.2, miner="batch_hard")(x, labels).item() == pytest.approx(
        pml(x, labels, pml_miners.BatchHardMiner()(x, labels)).item(), rel=1e-6
    )
    assert TripletMarginLoss(0.2)(x, labels).item() == pytest.approx(pml(x, labels).item(), rel=1e-6)


def test_cross_modal_reference_set():
    x, ref = unit(10, 6, 5, torch.float32), unit(12, 6, 6, torch.float32)
    labels, ref_labels = torch.arange(10) % 4, torch.arange(12) % 4
    want = pml_losses.TripletMarginLoss(margin=0.2)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    assert TripletMarginLoss(0.2)(x, labels, ref_emb=ref, ref_labels=ref_labels).item() == pytest.approx(want.item())


@pytest.mark.parametrize("miner", [None, "batch_hard", "semi_hard"])
def test_gradcheck_float64(miner):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    x = unit(7, 4, 7).requires_grad_()
    loss = TripletMarginLoss(0.3, miner=miner)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x,))


def test_permutation_invariance():
    x, labels = unit(32, 8, 8), torch.arange(32) % 6
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(9))
    for miner in (None, "batch_hard", "semi_hard", "hard"):
        loss = TripletMarginLoss(0.2, miner=miner)
        assert loss(x[perm], labels[perm]).item() == pytest.approx(loss(x, labels).item(), rel=1e-10)


def test_zero_when_every_margin_is_met(recwarn):
    centres = torch.eye(4, dtype=torch.float64)
    x = F.normalize(centres.repeat_interleave(3, 0) + 0.01 * unit(12, 4, 10), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(3)
    for miner in (None, "batch_hard", "semi_hard", "all"):
        loss = TripletMarginLoss(0.2, miner=miner)(x, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    assert not any(issubclass(w.category, NoValidTupleWarning) for w in recwarn)
    assert torch.count_nonzero(x.grad) == 0


def test_no_positive_pair_gives_warned_attached_zero():
    x = unit(5, 4, 11).requires_grad_()
    with pytest.warns(NoValidTupleWarning, match="no valid"):
        loss = TripletMarginLoss()(x, torch.arange(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_bad_input():
    x = unit(6, 4, 12)
    loss = create_loss("triplet", margin=0.2, miner="semi_hard")
    with pytest.raises(ValueError, match="length 4 but there are 6"):
        loss(x, torch.arange(4))
    with pytest.raises(ValueError, match="integer dtype"):
        loss(x, torch.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.full((6, 4), float("nan")), torch.arange(6))
    with pytest.raises(ValueError, match="distance must be one of"):
        TripletMarginLoss(distance="manhattan")
    with pytest.raises(ValueError, match="anchor, positive, negative"):
        loss(x, torch.arange(6) % 2, indices_tuple=(torch.tensor([0]), torch.tensor([2])))
    with pytest.raises(ValueError, match="valid names"):
        TripletMarginLoss(miner="nope")
