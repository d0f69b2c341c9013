"""Frozen-backbone feature cache: run each tower's backbone once, store the pooled features, train only the heads.

On a CPU, the backbone forward dominates training cost by two to three orders of magnitude (SPEC §6: heads on
precomputed features ~8,000 samples/s vs ~100 for a Lite0 forward), so with frozen towers the features are computed
once per (model, dataset, split, transform) and reused by every epoch and every later run. The cache is
augmentation-free by construction: images go through the model's *eval* transform, so training sees each image as
one fixed feature vector (no random crops/flips). The key hashes the model config, the dataset description, the
image transform's ``repr`` and the backbone's weights, so changing any of them recomputes the features.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from metrank import distributed
from metrank.training.checkpoint import atomic_torch_save


def default_cache_dir() -> Path:
    return Path(os.environ.get("METRANK_DATA", Path.home() / ".cache" / "metrank")) / "features"


def _weights_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the frozen weights: a few statistics of every parameter tensor."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point() and p.numel():
                flat = p.detach().float().flatten()
                h.update(f"{name}:{tuple(p.shape)}:{flat.sum().item():.6e}:{flat[::max(1, flat.numel() // 7)].tolist()}"
                         .encode())
    return h.hexdigest()


def feature_cache_key(model: Any, description: Dict[str, Any]) -> str:
    """Hex key of (model config, backbone architecture and weights, eval transform, dataset description).

    Only the backbones (``image_backbone``/``text_backbone``) enter the key, and ``embed_dim`` is left out of the
    config, so runs that differ only in their heads (projection size, initialisation) share the features."""
    config = dict(getattr(model, "config", {"name": type(model).__name__}))
    config["kwargs"] = {k: v for k, v in dict(config.get("kwargs", {})).items() if k != "embed_dim"}
    backbones = [m for m in (getattr(model, "image_backbone", model), getattr(model, "text_backbone", None))
                 if m is not None]
    payload = {
        "model": config,
        "architecture": [repr(m) for m in backbones],
        "weights": [_weights_digest(m) for m in backbones],
        "transform": repr(getattr(model, "image_transform", None)),
        "data": description,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_image_features(model: Any, load_image: Callable[[int], Any], n: int, batch_size: int = 64,
                           device: Union[str, torch.device] = "cpu", desc: str = "image features") -> torch.Tensor:
    """``model.image_features`` of images ``load_image(0..n-1)`` (PIL) through ``model.image_transform``."""
    model.eval()
    out: List[torch.Tensor] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=distributed.rank() != 0):
        pixels = torch.stack([model.image_transform(load_image(i)) for i in range(start, min(n, start + batch_size))])
        out.append(model.image_features(pixels.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _to_device(tokens: Any, device: Union[str, torch.device]) -> Any:
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(tokens).items()}


@torch.no_grad()
def compute_text_features(model: Any, texts: Sequence[str], batch_size: int = 256,
                          device: Union[str, torch.device] = "cpu", desc: str = "text features") -> torch.Tensor:
    """``model.text_features`` of ``texts`` tokenised with ``model.tokenize``."""
    model.eval()
    out: List[torch.Tensor] = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=distributed.rank() != 0):
        tokens = model.tokenize(list(texts[start:start + batch_size]))
        out.append(model.text_features(_to_device(tokens, device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def cached(cache_dir: Optional[Union[str, Path]], name: str, key: str,
           compute: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Load ``<cache_dir>/<name>-<key>.pt`` or compute it with ``compute()`` and write it atomically.

    Under ``torch.distributed`` rank 0 computes and writes while the other ranks wait, then read the file.
    """
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{key}.pt"
    if distributed.rank() == 0 and not path.is_file():
        atomic_torch_save(compute(), path)
    if distributed.is_distributed():
        torch.distributed.barrier()
    return torch.load(path, map_location="cpu", weights_only=True)
