"""Optimizer (adamw | sgd) with parameter groups (heads, trained backbone parts, loss parameters) and the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from metrank.errors import ConfigError
from metrank.training.config import OptimConfig, ScheduleConfig


def build_optimizer(
    cfg: OptimConfig,
    head_params: Sequence[torch.nn.Parameter],
    loss_params: Sequence[torch.nn.Parameter],
    backbone_groups: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = (),
) -> torch.optim.Optimizer:
    """Heads use ``lr``/``weight_decay``; each ``(params, lr)`` of ``backbone_groups`` (a tower's trained backbone
    part) its own learning rate and ``backbone_weight_decay`` (default ``weight_decay``); loss parameters (e.g. a
    learnable logit scale) use ``loss_lr`` (default ``lr``) and ``loss_weight_decay`` (default 0: decaying a
    temperature towards 0 is never wanted)."""
    groups = [{"params": list(head_params), "weight_decay": cfg.weight_decay, "lr": cfg.lr}]
    decay = cfg.backbone_weight_decay if cfg.backbone_weight_decay is not None else cfg.weight_decay
    groups += [{"params": list(params), "weight_decay": decay, "lr": lr} for params, lr in backbone_groups]
    if loss_params:
        groups.append(
            {
                "params": list(loss_params),
                "weight_decay": cfg.loss_weight_decay,
                "lr": cfg.loss_lr if cfg.loss_lr is not None else cfg.lr,
            }
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"unknown optimizer {cfg.name!r}; valid names: adamw, sgd")


def layer_decay_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]],
    layer_of: Callable[[str], int],
    n_blocks: int,
    lr: float,
    decay: float,
) -> list[tuple[list[torch.nn.Parameter], float]]:
    """Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT): a backbone parameter of
    layer id ``l`` (``layer_of``: 0 = stem, ``i + 1`` = block ``i``, ``n + 1`` = tail) gets
    ``lr * decay ** (n + 1 - l)``, i.e. block ``i`` of ``n`` trains at ``lr * decay ** (n - i)``: layers near the
    input, which hold the most general features, move least. One ``(params, lr)`` group per layer, in layer order."""
    by_layer: dict[int, list[torch.nn.Parameter]] = {}
    for name, param in named:
        by_layer.setdefault(layer_of(name), []).append(param)
    return [(by_layer[layer], lr * decay ** (n_blocks + 1 - layer)) for layer in sorted(by_layer)]


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup_steps``, then constant or a
    half-cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.name not in ("cosine", "constant"):
        raise ConfigError(f"unknown schedule {cfg.name!r}; valid names: constant, cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
