"""Training: configs, the one loop for every tower mode and loss, caches, GradCache, checkpoints/resume, logs, DDP.

Each tower trains in one of four modes (``model.image`` / ``model.text`` in the config): ``heads`` (projection heads
on cached backbone features: minutes on a CPU), ``last_n`` (the last N blocks; the frozen prefix's activations are
cached when the transform is deterministic), ``lora`` (PEFT adapters) or ``full``. Any registered loss trains:
pairwise losses are made symmetric with ``CrossModalLoss``, paired ones (SigLIP, quadruplet, CPRD with its
cross-encoder teacher) are used as they are. ``model_best.pt`` is chosen on a validation split carved from the
training identities; the test split gives the final numbers only. The exported ``model_best.pt`` / ``model_final.pt``
hold the whole model and load with ``metrank.encoders.load_checkpoint``.

>>> from metrank.training import load_config, train
>>> result = train(load_config("train/configs/emoji_image_text.yaml", ["train.epochs=5"]))
>>> result.metrics["t2i_R@1"], result.out_dir / "model_best.pt"     # test metrics of the selected model
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
