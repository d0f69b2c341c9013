"""The trainable part of a frozen-backbone model: its projection heads plus the loss (and its parameters).

Wrapping heads *and* loss in one module lets DDP synchronise the loss parameters (e.g. InfoNCE's learnable logit
scale) together with the heads, and lets one state dict hold everything a resume needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metrank import distributed
from metrank.errors import InputError


def find_head_parameters(model: nn.Module, image_dim: int, text_dim: int | None) -> list[str]:
    """Names of the parameters the heads use: those that receive a gradient through ``image_head`` (and
    ``text_head``) from a probe batch of features. Works for any ``RetrievalModel`` whatever its head layout."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model.image_head(torch.ones(2, image_dim, device=device)).float().sum()
    if text_dim is not None:
        out = out + model.text_head(torch.ones(2, text_dim, device=device)).float().sum()
    out.backward()
    names = [name for name, p in model.named_parameters() if p.grad is not None]
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(saved[name])
    model.train(was_training)
    if not names:
        raise InputError(f"{type(model).__name__}.image_head has no trainable parameters; nothing to train")
    return names


class HeadsAndLoss(nn.Module):
    """``model``'s heads (only the parameters named in ``head_names`` train; the backbone stays frozen) + loss.

    ``forward`` returns the scalar loss of one batch of backbone features (after ``feature_dropout``, active in
    training mode only, so evaluation and the exported model see the features unchanged):

    * image-text: ``forward(image_feats, text_feats, ids)`` -> ``CrossModalLoss(image_emb, text_emb, ids)``;
    * metric: ``forward(image_feats, labels)`` -> ``loss(emb, labels, miner(emb, labels))`` computed over the batch
      gathered from every rank (global negatives; with DDP the gradient equals that of the global-batch loss).
    """

    def __init__(
        self,
        model: nn.Module,
        head_names: list[str],
        loss: nn.Module,
        task: str,
        miner: nn.Module | None = None,
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.model, self.loss, self.miner, self.task = model, loss, miner, task
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.head_names = list(head_names)
        heads = set(self.head_names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)

    def embed_images(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.image_head(feats).float(), dim=-1)

    def embed_texts(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.text_head(feats).float(), dim=-1)

    def forward(self, image_feats: torch.Tensor, other: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        image_emb = self.embed_images(self.feature_dropout(image_feats))
        if self.task == "image_text":
            return self.loss(image_emb, self.embed_texts(self.feature_dropout(other)), ids)
        emb = distributed.all_gather_with_grad(image_emb)
        labels = distributed.all_gather_no_grad(other)
        indices = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, indices)

    def head_parameters(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[name] for name in self.head_names]

    def loss_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.loss.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers that training changes: heads (+ buffers of head modules) and loss state.

        The frozen backbone is rebuilt from the model config on resume, so it is not part of the state."""
        prefixes = {name.rsplit(".", 1)[0] for name in self.head_names}
        state = {}
        for name, value in self.state_dict().items():
            if name.startswith("model."):
                inner = name[len("model.") :]
                if inner not in self.head_names and inner.rsplit(".", 1)[0] not in prefixes:
                    continue
            state[name] = value.detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        missing = set(self.trainable_state()) - set(state)
        unexpected = set(state) - set(self.state_dict())
        if missing or unexpected:
            raise InputError(
                f"training state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; was it written with another model config?"
            )
        self.load_state_dict(state, strict=False)
