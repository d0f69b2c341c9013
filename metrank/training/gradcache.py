"""GradCache: a large contrastive batch in the memory of a small one, with the same gradient.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (RepL4NLP 2021).
For a loss ``L(f(x_1..x_B))`` of the whole batch's embeddings ``e = f(x)``:

1. embed the batch chunk by chunk *without* a graph: ``e_c = f(x_c)`` under ``no_grad`` (the RNG state of each
   chunk is recorded, so dropout draws the same masks again in step 3);
2. compute the loss on the whole batch of (detached, leaf) embeddings and back-propagate to them: ``g = dL/de``
   (the loss parameters, e.g. InfoNCE's logit scale, receive their gradient here);
3. for each chunk, re-embed with a graph and back-propagate ``g_c``: ``backward(e_c, g_c)``, which accumulates
   ``sum_c (de_c/dtheta)^T g_c = dL/dtheta`` in the model parameters.

Peak activation memory is that of one chunk; the gradient equals the full-batch gradient up to float rounding. It is
exact for any loss that is a function of the batch's embeddings (mining inside the loss included); a loss whose
value does not reach the embeddings through autograd cannot be chunked and raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from metrank.errors import InputError


def chunk_rows(rows: Any, size: int) -> list[Any]:
    """Split a batch of rows (a tensor, or a tuple of tensors sharing the first dimension) into chunks of ``size``."""
    if isinstance(rows, tuple):
        parts = [chunk_rows(t, size) for t in rows]
        return [tuple(p[i] for p in parts) for i in range(len(parts[0]))]
    return list(rows.split(size))


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


class _Embedded:
    """Embeddings of one modality computed chunk by chunk without a graph, and how to redo one chunk with it."""

    def __init__(self, embed: Callable[[Any], torch.Tensor], rows: Any, size: int, device: torch.device) -> None:
        self.embed, self.device = embed, device
        self.chunks = chunk_rows(rows, size)
        self.states = []
        parts = []
        with torch.no_grad():
            for chunk in self.chunks:
                self.states.append(_rng_states(device))
                parts.append(embed(chunk))
        self.emb = torch.cat(parts).detach().requires_grad_(True)

    def backward(self, scale_free_grad: torch.Tensor) -> None:
        after = _rng_states(self.device)
        start = 0
        for chunk, state in zip(self.chunks, self.states):
            _set_rng_states(state, self.device)
            emb = self.embed(chunk)
            emb.backward(scale_free_grad[start : start + len(emb)])
            start += len(emb)
        _set_rng_states(after, self.device)


def grad_cache_backward(
    embed_images: Callable[[Any], torch.Tensor],
    embed_texts: Callable[[Any], torch.Tensor] | None,
    loss_of: Callable[..., torch.Tensor],
    image_rows: Any,
    other: Any,
    ids: torch.Tensor | None,
    chunk: int,
    device: torch.device,
    scale: float = 1.0,
    **extra: Any,
) -> torch.Tensor:
    """Run steps 1-3 of the module docstring for one batch; the gradients of ``scale * loss`` accumulate in the
    parameters. ``other`` is the caption rows (``embed_texts`` given) or the labels (metric learning). Returns the
    loss (detached)."""
    images = _Embedded(embed_images, image_rows, chunk, device)
    texts = _Embedded(embed_texts, other, chunk, device) if embed_texts is not None else None
    loss = loss_of(images.emb, texts.emb if texts is not None else other, ids, **extra)
    (loss * scale).backward()
    if images.emb.grad is None or (texts is not None and texts.emb.grad is None):
        raise InputError(
            "train.grad_cache: the loss does not reach the embeddings through autograd, so its gradient cannot be "
            "split into chunks; use this loss without train.grad_cache"
        )
    images.backward(images.emb.grad)
    if texts is not None and texts.emb.grad is not None:
        texts.backward(texts.emb.grad)
    return loss.detach()
