"""Training on cached frozen-backbone features: configs, feature cache, loop, checkpoints/resume, logging, DDP.

The towers stay frozen: their backbone features are computed once (eval transform, no augmentation) and cached,
and only the projection heads (plus loss parameters such as InfoNCE's logit scale) are trained -- minutes on a
CPU. The exported ``model_best.pt`` / ``model_final.pt`` hold the whole model (frozen towers + trained heads) and
load with ``metrank.encoders.load_checkpoint``.

>>> from metrank.training import load_config, train
>>> result = train(load_config("train/configs/emoji_image_text.yaml", ["train.epochs=5"]))
>>> result.metrics["t2i_R@1"], result.out_dir / "model_best.pt"
"""

from metrank.training.config import TrainConfig, config_from_dict, load_config, parse_overrides
from metrank.training.feature_cache import default_cache_dir
from metrank.training.trainer import Trainer, TrainResult, evaluate, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "config_from_dict",
    "default_cache_dir",
    "evaluate",
    "load_config",
    "parse_overrides",
    "train",
]
