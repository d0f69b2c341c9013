"""CrossModalLoss and SigLipLoss under real 2-process DDP (gloo, CPU) equal the single-process loss on the
concatenated batch.

Correspondence checked: each rank computes the local-loss form (its own anchors against every rank's references via
``all_gather_with_grad``). For a mean-reduced loss with the same number of positive pairs per rank,
``L_global = (1/W)·Σ_r L_r``; the gather's backward all-reduces the reference-side gradients, so rank r's
embeddings receive ``∂(Σ_r' L_r')/∂x_r``, and DDP's gradient *averaging* over the W ranks then gives exactly
``∂L_global/∂θ``. So: mean of the rank losses == single-process loss, and DDP parameter gradients ==
single-process gradients (no extra factor W). SigLIP sums over pairs and divides by the local batch size, so the
same holds for it with any ids.

The cross-batch memory (XBM) queue: every rank enqueues every rank's rows, so after any number of steps each rank's
queue equals a single process's queue fed the concatenated global batches, and a memory-augmented loss keeps the
correspondence above.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from metrank.losses import CrossModalLoss, HardNegativeLoss, InfoNCELoss, MemoryQueue, PairedLoss, SigLipLoss

pytestmark = pytest.mark.ddp

WORLD = 2
MEMORY, STEPS = 10, 4


class PairModel(nn.Module):
    """Two linear towers plus the loss, so DDP also averages the loss's own parameters (InfoNCE's logit scale)."""

    def __init__(self, loss: nn.Module, memory_size: int = 0) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(6, 4), nn.Linear(6, 4)
        self.loss = loss if isinstance(loss, PairedLoss) else CrossModalLoss(loss, memory_size=memory_size)

    def forward(self, image_x, text_x, ids):
        return self.loss(F.normalize(self.image(image_x), dim=1), F.normalize(self.text(text_x), dim=1), ids)


def build(loss_name: str, memory_size: int = 0) -> PairModel:
    torch.manual_seed(0)
    losses = {"infonce": InfoNCELoss, "hard_negative": lambda: HardNegativeLoss(margin=0.5), "siglip": SigLipLoss}
    return PairModel(losses[loss_name](), memory_size).double()


def global_batch():
    g = torch.Generator().manual_seed(1)
    image_x, text_x = (
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
    )
    # duplicated ids within a rank (0, 2) and across ranks (7); 7 positive pairs per rank and direction
    ids = torch.tensor([0, 0, 1, 7, 2, 2, 3, 7])
    return image_x, text_x, ids


def worker(rank, port, expected):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for loss_name, (expected_loss, expected_grads) in expected.items():
            model = DistributedDataParallel(build(loss_name))
            image_x, text_x, ids = (t.chunk(WORLD)[rank] for t in global_batch())
            loss = model(image_x, text_x, ids)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / WORLD, expected_loss, rtol=1e-12, atol=1e-12, msg=loss_name)
            for name, param in model.module.named_parameters():
                torch.testing.assert_close(
                    param.grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=f"{loss_name}: {name}"
                )
    finally:
        dist.destroy_process_group()


def single_process(loss_name):
    model = build(loss_name)
    loss = model(*global_batch())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def test_ddp_equals_single_process_for_infonce_hard_negative_and_siglip(free_port):
    expected = {name: single_process(name) for name in ("infonce", "hard_negative", "siglip")}
    mp.spawn(worker, args=(free_port, expected), nprocs=WORLD, join=True)


def stream():
    """STEPS global batches of 4 pairs (2 per rank) with ids unique over the whole stream."""
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(4, 6, generator=g, dtype=torch.float64),
            torch.randn(4, 6, generator=g, dtype=torch.float64),
            torch.arange(4) + 4 * step,
        )
        for step in range(STEPS)
    ]


def memory_worker(rank, port, expected_queue, expected_steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        queue = MemoryQueue(MEMORY)
        for image_x, _, ids in stream():
            queue.push(x=image_x.chunk(WORLD)[rank], ids=ids.chunk(WORLD)[rank])
        for name, tensor in expected_queue.items():
            torch.testing.assert_close(queue[name], tensor, rtol=0, atol=0, msg=f"queue field {name}")
        for loss_name, per_step in expected_steps.items():
            model = DistributedDataParallel(build(loss_name, MEMORY))
            for step, (image_x, text_x, ids) in enumerate(stream()):
                model.zero_grad()
                loss = model(*(t.chunk(WORLD)[rank] for t in (image_x, text_x, ids)))
                loss.backward()
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                expected_loss, expected_grads = per_step[step]
                msg = f"{loss_name} step {step}"
                torch.testing.assert_close(mean_loss / WORLD, expected_loss, rtol=1e-12, atol=1e-12, msg=msg)
                for name, param in model.module.named_parameters():
                    torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=msg)
            assert len(model.module.loss.memory) == MEMORY
    finally:
        dist.destroy_process_group()


def single_process_memory(loss_name):
    model = build(loss_name, MEMORY)
    out = []
    for image_x, text_x, ids in stream():
        model.zero_grad()
        loss = model(image_x, text_x, ids)
        loss.backward()
        out.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    return out


def test_ddp_memory_queue_equals_single_process_on_the_concatenated_stream(free_port):
    queue = MemoryQueue(MEMORY)
    for image_x, _, ids in stream():
        queue.push(x=image_x, ids=ids)
    expected_queue = {"x": queue["x"], "ids": queue["ids"]}
    assert expected_queue["ids"].tolist() == list(range(6, 16))  # the oldest 6 of 16 rows were dropped
    expected_steps = {name: single_process_memory(name) for name in ("infonce", "hard_negative")}
    mp.spawn(memory_worker, args=(free_port, expected_queue, expected_steps), nprocs=WORLD, join=True)
