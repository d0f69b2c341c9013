"""Checkpoints of ``RetrievalModel``: ``{"config", "state_dict", "extra"}`` written atomically, read back with
``torch.load(weights_only=True)`` and rebuilt offline from ``config`` (no pretrained weights are fetched: every
weight, the pretrained backbones included, comes from the checkpoint). LoRA adapters recorded in
``config["tuning"]`` (see :mod:`metrank.encoders.tuning`) are injected before the weights load: a LoRA-trained model
is stored with its adapters, unmerged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from metrank.atomic import atomic_torch_save, load_torch_file
from metrank.encoders.factory import create_model
from metrank.encoders.model import RetrievalModel
from metrank.encoders.tuning import apply_tuning
from metrank.errors import StateError

FORMAT = "metrank.encoder.v1"
_SAFE_SCALARS = (str, int, float, bool, type(None), torch.Tensor)


def _check_safe(value: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` loads with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_safe(key, where)
            _check_safe(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_safe(item, f"{where}[{i}]")
    elif not isinstance(value, _SAFE_SCALARS):
        raise StateError(
            f"checkpoint entry {where} is a {type(value).__name__}; only tensors, numbers, strings, "
            "lists and dicts can be stored (they must load with weights_only=True)"
        )


def save_checkpoint(path: str | os.PathLike, model: RetrievalModel, **extra: Any) -> Path:
    """Write ``model`` (config + state dict) and ``extra`` (epoch, metrics, ...) to ``path`` atomically."""
    _check_safe(model.config, "config")
    _check_safe(extra, "extra")
    path = Path(path)
    payload = {"format": FORMAT, "config": model.config, "state_dict": model.state_dict(), "extra": extra}
    atomic_torch_save(payload, path)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (``config``, ``state_dict``, ``extra``), checked for the metrank format."""
    path = Path(path)
    payload = load_torch_file(path, "checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StateError(f"{str(path)!r} is not a metrank encoder checkpoint (written by save_checkpoint)")
    return payload


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu", with_extra: bool = False
) -> RetrievalModel | tuple[RetrievalModel, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (architecture from its config, weights from its state dict).

    Returns the model in eval mode, or ``(model, extra)`` with ``with_extra=True``.
    """
    payload = read_checkpoint(path, map_location)
    config = payload["config"]
    model = create_model(config["name"], pretrained=False, **config["kwargs"])
    if config.get("tuning"):
        apply_tuning(model, config["tuning"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return (model, payload["extra"]) if with_extra else model
