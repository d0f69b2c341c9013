"""Ray access for metrank.scale: the lazy import, cluster start-up and resource checks."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from metrank.errors import ConfigError, InputError


def require_ray() -> ModuleType:
    """``import ray``, or a ``ConfigError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("metrank.scale needs Ray: pip install 'metrank[ray]' (ray, pyarrow)") from None
    return ray


def connect(address: str | None = None, **init_kwargs: Any) -> ModuleType:
    """Join the Ray cluster at ``address`` (``None``: the one ``RAY_ADDRESS`` names, else a new local one) unless
    this process is connected already; returns the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, **init_kwargs)
    return ray


def check_gpus(needed: float) -> None:
    """``InputError`` when the cluster has fewer than ``needed`` GPUs (asked for, e.g. with ``--gpus``)."""
    if needed <= 0:
        return
    available = require_ray().cluster_resources().get("GPU", 0)
    if available < needed:
        raise InputError(
            f"{needed:g} GPUs were asked for but the Ray cluster has {available:g}; start GPU nodes "
            "(ray start --num-gpus=N) or run on CPU workers (leave out --gpus / use_gpu=False)"
        )
