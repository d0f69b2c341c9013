"""Encoders: ``create_model(name, pretrained=True, **kw) -> RetrievalModel``, checkpoints, pretrained weights.

>>> model = create_model("lite0-minilm")            # offline: packaged EfficientNet-Lite0 + all-MiniLM-L6-v2
>>> image_emb = model.embed_images(pil_images)       # np.float32 [N, 256], L2-normalised
>>> text_emb = model.embed_texts(["a red apple"])
"""

from metrank.encoders import clip_model, timm_model  # noqa: F401  (register the builders)
from metrank.encoders.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from metrank.encoders.factory import MODELS, create_model
from metrank.encoders.model import RetrievalModel
from metrank.encoders.pooling import GeneralizedMeanPooling
from metrank.encoders.pretrained import load_lite0_imagenet_weights, map_state_dict_by_position

__all__ = [
    "MODELS",
    "create_model",
    "RetrievalModel",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "GeneralizedMeanPooling",
    "load_lite0_imagenet_weights",
    "map_state_dict_by_position",
]
