"""What each tower trains on, and the module that turns a batch into the loss.

Per tower and mode (``model.image`` / ``model.text`` in the config, see :mod:`metrank.encoders.tuning`), the rows of a
split are held as:

* ``heads``: the cached pooled backbone features (:mod:`metrank.training.feature_cache`); the tower is the head.
* ``last_n`` with a deterministic transform (text always; images unless ``data.augment``): the cached activations of
  the frozen prefix (computed once, like the features); the tower is the last N blocks + tail + head.
* ``last_n`` with augmentation: raw images; the prefix runs under ``no_grad`` every step, then the trained part.
* ``lora`` / ``full``: raw images (through the train transform) or token ids; the whole tower runs every step.

:class:`TrainModule` holds the model, the towers and the loss: ``forward(image_rows, other, ids, **extra)`` returns
the loss of one batch (image-text: a paired batch; metric: images and labels, gathered across ranks). The
backbones stay in eval mode while training (BatchNorm statistics and dropout fixed): this is what makes a cached
prefix exactly equal to running the frozen blocks, and resume bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metrank import distributed
from metrank.encoders.tuning import BlockSplit, require_split, tower_backbone, tower_head
from metrank.errors import InputError


class TensorRows:
    """Rows held as tensors (cached features, prefix activations, token ids); ``take`` returns a tuple (or the one
    tensor) of the rows ``index``, on ``device``."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise InputError("cached row tensors must have the same number of rows")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def take(self, index: torch.Tensor, device: torch.device) -> Any:
        out = tuple(t[index].to(device) for t in self.tensors)
        return out[0] if len(out) == 1 else out


class ImageRows:
    """Raw images loaded and transformed per batch (``load(row) -> PIL``, ``transform(PIL) -> [3, H, W]``)."""

    def __init__(self, load: Callable[[int], Any], n: int, transform: Callable[[Any], torch.Tensor]) -> None:
        self.load, self.n, self.transform = load, n, transform

    def __len__(self) -> int:
        return self.n

    def take(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.stack([self.transform(self.load(int(i))) for i in index.tolist()]).to(device)


Rows = TensorRows | ImageRows


class Tower(nn.Module):
    """One tower's trained forward: rows of its kind (see the module docstring) -> unnormalised embeddings.

    ``model`` is not registered here (the :class:`TrainModule` owns it once for both towers)."""

    def __init__(
        self,
        model: Any,
        tower: str,
        mode: str,
        blocks: int = 0,
        cached_prefix: bool = False,
        feature_dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.tower, self.mode, self.blocks, self.cached_prefix = tower, mode, blocks, cached_prefix
        self.feature_dropout = nn.Dropout(feature_dropout)
        backbone = tower_backbone(model, tower)
        self.__dict__["split"] = require_split(backbone, tower, checkpointing) if mode == "last_n" else None
        if checkpointing and mode in ("lora", "full"):
            set_grad_checkpointing(backbone)

    model: Any
    split: BlockSplit | None

    @property
    def head(self) -> Any:
        return tower_head(self.model, self.tower)

    def features(self, rows: Any) -> torch.Tensor:
        """Pooled backbone features of a batch of rows."""
        if self.mode == "heads":
            return rows
        if self.mode == "last_n":
            split = self.split
            assert split is not None
            if self.cached_prefix:
                state = rows if isinstance(rows, tuple) else (rows,)
            else:
                with torch.no_grad():
                    state = split.prefix(rows, self.blocks)
            return split.suffix(state, self.blocks)
        if self.tower == "image":
            return self.model.image_features(rows)
        return self.model.text_features(rows)

    def forward(self, rows: Any) -> torch.Tensor:
        return self.head(self.feature_dropout(self.features(rows)))


def set_grad_checkpointing(backbone: Any) -> None:
    """Activation checkpointing in a trained backbone (timm ``set_grad_checkpointing``, HF
    ``gradient_checkpointing_enable``), or a ``ConfigError``-style ``InputError`` when it offers neither."""
    if hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    elif hasattr(getattr(backbone, "transformer", None), "gradient_checkpointing_enable"):
        backbone.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise InputError(
            f"train.checkpointing: {type(backbone).__name__} offers no activation checkpointing; set it to false"
        )


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in at least float32 (autocast outputs are upcast; float64 stays float64)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


class TrainModule(nn.Module):
    """Model + towers + loss (+ miner): ``forward(image_rows, other, ids=None, **extra) -> loss``.

    * image-text: ``other`` = caption rows, ``ids`` the image id of each pair; a paired loss
      ``loss(image_emb, text_emb, ids, **extra)`` (pairwise losses arrive wrapped in ``CrossModalLoss``).
    * metric: ``other`` = labels; ``loss(emb, labels, miner(emb, labels))`` over the batch gathered from every rank.

    Wrapping everything trained in one module lets DDP synchronise heads, backbone parts and loss parameters, and lets
    one state dict hold what a resume needs.
    """

    def __init__(
        self,
        model: Any,
        image: Tower,
        text: Tower | None,
        loss: nn.Module,
        task: str,
        miner: nn.Module | None,
        trainable: Sequence[str],
    ) -> None:
        super().__init__()
        self.model, self.image, self.text, self.loss, self.miner, self.task = model, image, text, loss, miner, task
        self.trainable_names = list(trainable)
        names = set(self.trainable_names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)

    def train(self, mode: bool = True) -> TrainModule:
        """Training mode for heads, dropout on features and the loss; the backbones stay in eval mode."""
        super().train(mode)
        self.model.eval()
        for head in (self.model.image_projection, self.model.text_projection):
            if head is not None:
                head.train(mode)
        return self

    def embed_images(self, rows: Any) -> torch.Tensor:
        return _normalize(self.image(rows))

    def embed_texts(self, rows: Any) -> torch.Tensor:
        if self.text is None:
            raise InputError("this model has no text tower")
        return _normalize(self.text(rows))

    def loss_of(self, image_emb: torch.Tensor, other: torch.Tensor, ids: torch.Tensor | None, **extra: Any):
        """The loss given the embeddings (image-text: ``other`` = text embeddings; metric: ``other`` = labels)."""
        if self.task == "image_text":
            return self.loss(image_emb, other, ids, **extra)
        emb = distributed.all_gather_with_grad(image_emb)
        labels = distributed.all_gather_no_grad(other)
        indices = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, indices)

    def forward(self, image_rows: Any, other: Any, ids: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        image_emb = self.embed_images(image_rows)
        return self.loss_of(image_emb, self.embed_texts(other) if self.task == "image_text" else other, ids, **extra)

    def model_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trained model parameters by group, as ``(name, parameter)``: ``heads`` (projections) and the
        ``image``/``text`` backbone parts (names relative to the backbone)."""
        params = dict(self.model.named_parameters())
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"heads": [], "image": [], "text": []}
        for name in self.trainable_names:
            if name.startswith(("image_projection.", "text_projection.")):
                groups["heads"].append((name, params[name]))
            else:
                tower = "image" if name.startswith("image_backbone.") else "text"
                groups[tower].append((name.split(".", 1)[1], params[name]))
        return groups

    def loss_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.loss.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes: the trained model parameters and the loss state (parameters and buffers)."""
        params = dict(self.model.named_parameters())
        state = {f"model.{name}": params[name].detach().clone() for name in self.trainable_names}
        state.update({f"loss.{k}": v.detach().clone() for k, v in self.loss.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise InputError(
                f"training state does not match the model: missing {sorted(expected - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - expected)[:5]}; was it written with another model config?"
            )
        self.load_state_dict(state, strict=False)


class EMA:
    """Exponential moving average of the trained weights, ``w_ema <- d w_ema + (1 - d) w`` after each optimizer
    step (Polyak averaging); ``swapped()`` evaluates/exports with the averaged weights."""

    def __init__(self, module: TrainModule, decay: float) -> None:
        self.module, self.decay = module, decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.trainable_state().items()}

    @torch.no_grad()
    def update(self) -> None:
        for key, value in self.module.trainable_state().items():
            if value.is_floating_point():
                self.shadow[key].mul_(self.decay).add_(value.float(), alpha=1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state(self) -> dict[str, torch.Tensor]:
        current = self.module.trainable_state()
        return {k: v.to(current[k].dtype, copy=True) for k, v in self.shadow.items()}
