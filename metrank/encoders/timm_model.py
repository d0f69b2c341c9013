"""Image-only towers from timm: ``"timm/<name>"`` and ``"lite0"`` (EfficientNet-Lite0 with the packaged
ImageNet weights), each a pooled trunk plus a projection head."""

from __future__ import annotations

from typing import Any

import timm
from timm.data import resolve_data_config
from torch import nn

from metrank.encoders.factory import MODELS, Pretrained
from metrank.encoders.freezing import freeze_timm_trunk
from metrank.encoders.model import RetrievalModel
from metrank.encoders.pooling import replace_timm_pooling
from metrank.encoders.pretrained import (
    LITE0_PREPROCESS,
    LITE0_TIMM_NAME,
    load_lite0_imagenet_weights,
    local_weights_file,
)
from metrank.encoders.transforms import build_image_transforms
from metrank.errors import InputError

PROJECTIONS = ("linear", "mlp", "none")


def create_projection(kind: str, in_dim: int, out_dim: int, drop: float = 0.0) -> nn.Module:
    """Projection head: ``linear`` (``W x``), ``mlp`` (``W2 GELU(W1 x)``, hidden ``2·out_dim``) or ``none``."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(drop), nn.Linear(in_dim, out_dim, bias=False))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, 2 * out_dim), nn.GELU(), nn.Dropout(drop), nn.Linear(2 * out_dim, out_dim, bias=False)
        )
    if kind == "none":
        return nn.Identity()
    raise InputError(f"unknown projection {kind!r}; valid: {', '.join(PROJECTIONS)}")


def create_timm_trunk(arch: str, pretrained: Pretrained) -> Any:
    """timm model without classifier; weights: packaged Lite0 (``tf_efficientnet_lite0``, ``pretrained=True``),
    a local file (``pretrained=<path>``), timm's own source (``True``: needs a model hub or a warm cache; with
    ``HF_HUB_OFFLINE=1`` a missing file fails at once instead of after network retries)."""
    if not timm.is_model(arch.split(".")[0]):
        raise InputError(f"unknown timm model {arch!r} (see timm.list_models())")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=0)
    if isinstance(pretrained, str):
        file = local_weights_file(pretrained)
        return timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(file)})
    if arch == LITE0_TIMM_NAME:
        return load_lite0_imagenet_weights(timm.create_model(arch, pretrained=False, num_classes=0))
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as err:  # hub unreachable, no weights for this name, ...
        raise InputError(
            f"no offline pretrained weights for timm/{arch} ({type(err).__name__}: {err}); pass "
            "pretrained=False, or pretrained='<local checkpoint path>'; offline weights exist for "
            f"timm/{LITE0_TIMM_NAME} ('lite0')"
        ) from None


@MODELS.register("timm")
def build_timm_model(
    arch: str,
    pretrained: Pretrained = True,
    embed_dim: int = 256,
    projection: str = "linear",
    pooling: str | None = None,
    image_size: int | None = None,
    drop: float = 0.0,
    freeze_image: bool = False,
    unfreeze_image_last: int = 0,
    freeze_bn: bool = True,
) -> RetrievalModel:
    """Image-only ``RetrievalModel`` around timm model ``arch``.

    ``pooling`` ``"avg"|"max"|"gem"`` replaces a CNN's global pool (``None`` keeps the model's own);
    ``projection="none"`` keeps the trunk's features (``embed_dim`` becomes their size). ``freeze_image`` stops
    gradients into the trunk except its last ``unfreeze_image_last`` layer groups (BatchNorm statistics fixed when
    ``freeze_bn``). ``image_size`` defaults to the model's pretraining resolution.
    """
    trunk = create_timm_trunk(arch, pretrained)
    if pooling is not None:
        replace_timm_pooling(trunk, pooling)
    if freeze_image:
        freeze_timm_trunk(trunk, unfreeze_image_last, freeze_bn)
    data_cfg = resolve_data_config({}, model=trunk)
    if arch == LITE0_TIMM_NAME:
        data_cfg.update(LITE0_PREPROCESS)
    size = int(image_size or data_cfg["input_size"][-1])
    eval_transform, train_transform = build_image_transforms(
        size, data_cfg["mean"], data_cfg["std"], data_cfg.get("interpolation", "bicubic")
    )
    features = int(trunk.num_features)
    head = create_projection(projection, features, embed_dim, drop)
    out_dim = features if projection == "none" else embed_dim
    return RetrievalModel(trunk, head, out_dim, eval_transform, train_transform, config={})


@MODELS.register("lite0")
def build_lite0(
    pretrained: Pretrained = True,
    embed_dim: int = 256,
    projection: str = "linear",
    pooling: str = "avg",
    image_size: int = 224,
    **kwargs,
) -> RetrievalModel:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, packaged ImageNet weights) + projection head."""
    return build_timm_model(
        LITE0_TIMM_NAME,
        pretrained=pretrained,
        embed_dim=embed_dim,
        projection=projection,
        pooling=pooling,
        image_size=image_size,
        **kwargs,
    )
