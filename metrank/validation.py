"""Input checks shared by metrics, indexes, losses and miners: every failure is an ``InputError`` naming the problem.

Shape and dtype checks are free and always run. Value checks (finite entries, unit norms) read the data, which on a
GPU is a device-to-host sync; losses and miners therefore run them on their first call only, and on every call
while debug checks are on (:func:`set_debug_checks` or the environment variable ``METRANK_DEBUG_CHECKS=1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from metrank.errors import InputError

Array = np.ndarray | torch.Tensor

_debug_checks = os.environ.get("METRANK_DEBUG_CHECKS", "") not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Run value checks (finite, normalised) on every loss and miner call, not only the first one."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks() -> bool:
    """Whether value checks run on every call (see :func:`set_debug_checks`)."""
    return _debug_checks


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an ``int`` ≥ 1 (bools refused), else an ``InputError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``, else an ``InputError`` listing them."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_embeddings(x: Array, name: str = "embeddings", dim: int | None = None, values: bool = True) -> Array:
    """Check a 2-D float matrix of embeddings: non-empty, (optionally) ``dim`` columns wide, and finite unless
    ``values=False``.

    Returns the input unchanged (numpy arrays of other float dtypes are not converted here).
    """
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise InputError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}")
    is_float = x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
    if not is_float:
        raise InputError(f"{name} must have a floating dtype, got {x.dtype}; cast with .astype('float32')")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(x.shape)})")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"{name} has dimension {x.shape[1]} but {dim} was expected")
    if not values:
        return x
    finite = torch.isfinite(x.detach()).all().item() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not finite:
        bad = (
            (~torch.isfinite(x.detach())).any(1).nonzero().flatten()[:5].tolist()
            if isinstance(x, torch.Tensor)
            else np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()
        )
        raise InputError(f"{name} contains NaN or inf values (first bad rows: {bad}); check the model outputs")
    return x


def check_labels(labels: Array, n: int, name: str = "labels") -> Array:
    """Check a 1-D integer label vector of length ``n``."""
    if not isinstance(labels, (np.ndarray, torch.Tensor)):
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise InputError(f"{name} has length {labels.shape[0]} but there are {n} embeddings")
    is_int = (
        (not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool)
        if isinstance(labels, torch.Tensor)
        else np.issubdtype(labels.dtype, np.integer)
    )
    if not is_int:
        raise InputError(f"{name} must have an integer dtype, got {labels.dtype}")
    return labels
