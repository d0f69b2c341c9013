"""Cross-batch memory (XBM): the FIFO queue, the memory-bank loss and the paired losses' memory against explicit
reference sets built by hand from the earlier batches."""

import pytest
import torch
import torch.nn.functional as F

from metrank.losses import (
    LOSSES,
    CrossModalLoss,
    HardNegativeLoss,
    InfoNCELoss,
    MemoryBankLoss,
    MemoryQueue,
    TripletMarginLoss,
    create_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_queue_is_fifo_of_the_last_rows():
    queue = MemoryQueue(5)
    assert len(queue) == 0 and queue.get("x", torch.zeros(3, 2)).shape == (0, 2)
    for step in range(4):
        queue.push(x=torch.full((2, 3), float(step)), y=torch.arange(2) + 10 * step)
    assert len(queue) == 5
    assert queue["x"][:, 0].tolist() == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert queue["y"].tolist() == [11, 20, 21, 30, 31]
    with pytest.raises(ValueError, match="same number of rows"):
        queue.push(x=torch.zeros(2, 3), y=torch.zeros(3))
    with pytest.raises(ValueError, match="holds fields"):
        queue.push(x=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="positive integer"):
        MemoryQueue(0)


def test_queue_holds_no_gradient():
    x = unit(4, 3, 0).requires_grad_(True)
    queue = MemoryQueue(8)
    queue.push(x=x * 2)
    assert not queue["x"].requires_grad


@pytest.mark.parametrize("inner", ["triplet", "hard_negative"])
def test_memory_bank_loss_equals_in_batch_plus_previous_batches(inner):
    batches = [
        (unit(8, 6, 10 + s), torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(s))) for s in range(3)
    ]
    loss = create_loss("xbm", loss=inner, memory_size=12, weight=0.5)
    plain = LOSSES.create(inner)
    for step, (x, y) in enumerate(batches):
        value = loss(x, y)
        expected = plain(x, y)
        if step:
            previous_x = torch.cat([b[0] for b in batches[:step]])[-12:]
            previous_y = torch.cat([b[1] for b in batches[:step]])[-12:]
            expected = expected + 0.5 * plain(x, y, ref_emb=previous_x, ref_labels=previous_y)
        assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert len(loss.memory) == 12


def test_memory_bank_start_step_and_eval_mode():
    loss = MemoryBankLoss(TripletMarginLoss(), memory_size=16, start_step=1)
    x0, x1 = unit(6, 4, 20), unit(6, 4, 21)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss(x0, y)
    assert loss(x1, y).item() == pytest.approx(TripletMarginLoss()(x1, y).item())  # before start_step
    loss.step()
    assert loss(x1, y).item() != pytest.approx(TripletMarginLoss()(x1, y).item())
    loss.eval()
    before = len(loss.memory)
    loss(x1, y)
    assert len(loss.memory) == before
    with pytest.raises(ValueError, match="without ref_emb"):
        loss(x1, y, ref_emb=x0, ref_labels=y)


@pytest.mark.parametrize("inner", [HardNegativeLoss, InfoNCELoss])
def test_cross_modal_memory_extends_the_references(inner):
    steps = [(unit(6, 5, 30 + s), unit(6, 5, 40 + s), torch.arange(6) + 6 * s) for s in range(3)]
    steps[2] = (steps[2][0], steps[2][1], torch.tensor([0, 13, 14, 15, 16, 17]))  # id 0 was seen at step 0
    loss = CrossModalLoss(inner(), memory_size=10).double()
    reference = inner().double()
    for step, (img, txt, ids) in enumerate(steps):
        value = loss(img, txt, ids)
        queued_img = torch.cat([s[0] for s in steps[:step]] + [img[:0]])[-10:]
        queued_txt = torch.cat([s[1] for s in steps[:step]] + [txt[:0]])[-10:]
        queued_ids = torch.cat([s[2] for s in steps[:step]] + [ids[:0]])[-10:]
        ref_img, ref_txt, ref_ids = (
            torch.cat([img, queued_img]),
            torch.cat([txt, queued_txt]),
            torch.cat([ids, queued_ids]),
        )
        expected = 0.5 * (
            reference(img, ids, ref_emb=ref_txt, ref_labels=ref_ids)
            + reference(txt, ids, ref_emb=ref_img, ref_labels=ref_ids)
        )
        assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="memory_size"):
        CrossModalLoss(HardNegativeLoss(), memory_size=-1)
