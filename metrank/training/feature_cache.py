"""Frozen-backbone feature cache: run each tower's backbone once, store the pooled features, train only the heads.

On a CPU, the backbone forward dominates training cost by two to three orders of magnitude (SPEC §6: heads on
precomputed features ~8,000 samples/s vs ~100 for a Lite0 forward), so with frozen towers the features are computed
once per (model, dataset, split, transform) and reused by every epoch and every later run. The cache is
augmentation-free by construction: images go through the model's *eval* transform, so training sees each image as
one fixed feature vector (no random crops/flips). Image and text features are cached separately; each key hashes a
functional fingerprint of the tower (transform/tokenizer + backbone output on a fixed probe input) and the exact
list of images (or captions) encoded, so changing any of them recomputes the features while models that differ
only in their heads share them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

import torch
from PIL import Image
from tqdm.auto import tqdm

from metrank import distributed
from metrank.training.checkpoint import atomic_torch_save


def default_cache_dir() -> Path:
    return Path(os.environ.get("METRANK_DATA", Path.home() / ".cache" / "metrank")) / "features"


def _digest(x: torch.Tensor) -> str:
    """Hash of a feature tensor rounded to 4 decimals (equal for numerically equal backbones)."""
    return hashlib.sha1(torch.round(x.float().cpu(), decimals=4).numpy().tobytes()).hexdigest()


def _single_threaded(fn: Callable[[], str]) -> str:
    """Run ``fn`` on one CPU thread: float sums then do not depend on the thread count, so the fingerprint of a
    backbone is the same in every process on a machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def image_fingerprint(model: Any) -> str:
    """What image features depend on, as a hash of a function: the eval transform + image backbone applied to a
    fixed probe image. Two models with the same backbone and transform (e.g. the Lite0 tower of "lite0" and of
    "lite0-minilm" at one image size) share their cached features, whatever their heads."""
    probe = np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    pixels = model.image_transform(Image.fromarray(probe, mode="RGB"))[None]
    device = next(model.parameters()).device
    return _probe(model, lambda: model.image_features(pixels.to(device))) + f"-{tuple(pixels.shape)}"


@torch.no_grad()
def text_fingerprint(model: Any) -> str:
    """Tokenizer + text backbone applied to a fixed probe sentence (see :func:`image_fingerprint`)."""
    tokens = model.tokenize(["a probe sentence: grinning face with smiling eyes, 42 red apples"])
    device = next(model.parameters()).device
    shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else ""
    return _probe(model, lambda: model.text_features(_to_device(tokens, device))) + f"-{shape}"


def _probe(model: Any, forward: Callable[[], torch.Tensor]) -> str:
    was_training = model.training
    model.eval()
    try:
        return _single_threaded(lambda: _digest(forward()))
    finally:
        model.train(was_training)


def feature_cache_key(fingerprint: str, description: Dict[str, Any]) -> str:
    """Hex key of (backbone fingerprint, description of the exact data encoded)."""
    payload = {"fingerprint": fingerprint, "data": description}
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
