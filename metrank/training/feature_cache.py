"""Frozen-backbone feature cache: run each tower's backbone once, store the pooled features, train only the heads.

On a CPU, the backbone forward dominates training cost by two to three orders of magnitude (SPEC §6: heads on
precomputed features ~8,000 samples/s vs ~100 for a Lite0 forward), so with frozen towers the features are computed
once per (model, dataset, split, transform) and reused by every epoch and every later run. The cache is
augmentation-free by construction: images go through the model's *eval* transform, so training sees each image as
one fixed feature vector (no random crops/flips). Image and text features are cached separately; each key hashes
the tower (transform/tokenizer, backbone layers and exact weights) and the exact list of images (or captions)
encoded, so changing any of them recomputes the features while models that differ only in their heads share them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metrank import distributed
from metrank.atomic import atomic_torch_save, load_torch_file


def default_cache_dir() -> Path:
    return Path(os.environ.get("METRANK_DATA", Path.home() / ".cache" / "metrank")) / "features"


def module_fingerprint(module: torch.nn.Module) -> str:
    """Exact hash of a frozen module: the type and settings of every computing leaf module (convolutions, norms,
    pooling, attention, ...) in order, and the bytes of every parameter and buffer in order (names ignored, so the
    same backbone inside different wrappers hashes the same)."""
    h = hashlib.sha1()
    for m in module.modules():
        if not any(True for _ in m.children()) and not isinstance(m, (torch.nn.Identity, torch.nn.Dropout)):
            h.update(f"{type(m).__name__}({m.extra_repr()});".encode())
    with torch.no_grad():
        for tensor in module.state_dict().values():
            h.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_fingerprint(model: Any) -> str:
    """What image features depend on: the eval transform (its ``repr``) and the image backbone (exact weights and
    layer settings). Models differing only in their heads share cached features."""
    return hashlib.sha1(f"{model.image_transform!r}|{module_fingerprint(model.image_backbone)}".encode()).hexdigest()


def text_fingerprint(model: Any) -> str:
    """What text features depend on: the tokenizer (token ids of a probe sentence) and the text backbone."""
    tokens = model.tokenize(["a probe sentence: grinning face with smiling eyes, 42 red apples"])
    ids = tokens if isinstance(tokens, torch.Tensor) else torch.cat([v.flatten() for v in dict(tokens).values()])
    return hashlib.sha1(f"{ids.tolist()}|{module_fingerprint(model.text_backbone)}".encode()).hexdigest()


def feature_cache_key(fingerprint: str, description: dict[str, Any]) -> str:
    """Hex key of (backbone fingerprint, description of the exact data encoded)."""
    payload = {"fingerprint": fingerprint, "data": description}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_image_features(
    model: Any,
    load_image: Callable[[int], Any],
    n: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    desc: str = "image features",
) -> torch.Tensor:
    """``model.image_features`` of images ``load_image(0..n-1)`` (PIL) through ``model.image_transform``."""
    model.eval()
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=distributed.rank() != 0):
        pixels = torch.stack([model.image_transform(load_image(i)) for i in range(start, min(n, start + batch_size))])
        out.append(model.image_features(pixels.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _to_device(tokens: Any, device: str | torch.device) -> Any:
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(tokens).items()}


@torch.no_grad()
def compute_text_features(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    desc: str = "text features",
) -> torch.Tensor:
    """``model.text_features`` of ``texts`` tokenised with ``model.tokenize``."""
    model.eval()
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=distributed.rank() != 0):
        tokens = model.tokenize(list(texts[start : start + batch_size]))
        out.append(model.text_features(_to_device(tokens, device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def cached(
    cache_dir: str | Path | None, name: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Load ``<cache_dir>/<name>-<key>.pt`` or compute it with ``compute()`` and write it atomically.

    Under ``torch.distributed`` rank 0 computes and writes while the other ranks wait, then read the file.
    """
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{key}.pt"
    if distributed.rank() == 0 and not path.is_file():
        atomic_torch_save(compute(), path)
    if distributed.is_distributed():
        torch.distributed.barrier()
    return load_torch_file(path, "feature cache")
