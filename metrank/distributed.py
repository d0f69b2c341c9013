"""Ranks, devices and cross-rank gathering for global negatives under ``torch.distributed`` (one helper used by
every loss)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from metrank.errors import InputError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → this rank's CUDA device when one is visible, else the CPU; ``"gpu"`` means ``"cuda"``; a CUDA
    device asked for on a machine without one is an ``InputError`` (never a silent CPU fallback)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for but no CUDA device is visible; use 'cpu' or 'auto'")
        return torch.device(name) if ":" in name else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes_list = [int(s.item()) for s in sizes]
        if len(set(sizes_list)) != 1:
            raise InputError(f"all ranks must have the same batch size to gather, got {sizes_list}; use drop_last=True")
        out = [torch.empty_like(x) for _ in sizes_list]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); gradients flow back to each rank's own rows.

    With a single process this returns ``x`` itself. The backward all-reduces, so every rank must compute a loss
    that depends on the gathered tensor (the usual DDP contract); the result equals the gradient of the global loss
    divided by nothing extra, i.e. ``sum over ranks`` of each rank's local-loss gradient.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (labels, ids) from every rank along dim 0 without gradient."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)
