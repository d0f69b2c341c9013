"""A cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020) so losses and
miners can look for hard negatives beyond the current batch.

:class:`MemoryQueue` is a FIFO of the most recent ``size`` rows of named, detached tensors (embeddings, ids, teacher
inputs ...). Embeddings drift slowly once training has warmed up, so the rows of the last few batches are good
stand-ins for the current model's embeddings ("slow drift", XBM §3); the queue holds no gradient. Under
``torch.distributed`` every rank enqueues the rows of *all* ranks (gathered in rank order), so every rank holds the
same queue, equal to a single process's queue fed the concatenated global batches (tests/test_ddp.py).

:class:`MemoryBankLoss` is XBM's loss for class-label metric learning: ``L = loss(x, y) + weight · loss(x, y,
ref_emb=M_x, ref_labels=M_y)``: the usual in-batch term plus the current anchors against the queue as it was before
this batch (so no anchor meets itself), after which the batch is enqueued. The paired (image–text) losses take a
``memory_size`` instead (:class:`metrank.losses.CrossModalLoss`, :class:`metrank.losses.CPRDLoss`).
"""

from __future__ import annotations

import torch
from torch import nn

from metrank.distributed import all_gather_no_grad
from metrank.errors import InputError
from metrank.losses.base import LOSSES, PairwiseLoss
from metrank.pairs import IndicesTuple
from metrank.validation import check_positive_int


class MemoryQueue:
    """FIFO of the last ``size`` rows of named tensors; ``push(**rows)`` appends (gathered over DDP ranks), the
    fields read oldest row first. Not a module state: a restarted run starts with an empty queue, as XBM does."""

    def __init__(self, size: int) -> None:
        size = check_positive_int(size, "memory size")
        self.size = int(size)
        self.fields: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0] if self.fields else 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fields[name]

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The queued rows of ``name``, or an empty tensor shaped like ``like``'s rows while the queue is empty."""
        if name in self.fields:
            return self.fields[name]
        return like.new_empty((0, *like.shape[1:]))

    @torch.no_grad()
    def push(self, **rows: torch.Tensor) -> None:
        """Append one batch (every field the same number of rows, the same field names at every push); the oldest
        rows beyond ``size`` are dropped. Under DDP the rows of every rank are gathered first (a collective: call it
        on every rank)."""
        lengths = {name: t.shape[0] for name, t in rows.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(f"every queued field needs the same number of rows, got {lengths}")
        if self.fields and set(rows) != set(self.fields):
            raise InputError(f"the queue holds fields {sorted(self.fields)}, got {sorted(rows)}")
        for name, tensor in rows.items():
            gathered = all_gather_no_grad(tensor.detach())
            old = self.fields.get(name)
            joined = gathered if old is None else torch.cat([old, gathered.to(old.device)])
            self.fields[name] = joined[-self.size :].clone() if joined.shape[0] > self.size else joined

    def clear(self) -> None:
        self.fields = {}


@LOSSES.register("xbm")
class MemoryBankLoss(PairwiseLoss):
    steps_done: torch.Tensor
    loss: nn.Module

    """Cross-batch memory around any PML-convention loss (see the module doc).

    ``forward(embeddings, labels, indices_tuple=None)``: ``loss(x, y, indices_tuple) + weight · loss(x, y,
    ref_emb=queue, ref_labels=queue_labels)`` (the second term only once the queue is non-empty, and from
    ``start_step`` on), then ``x`` (detached) joins the queue. ``loss`` is a module or a registered loss name
    (built with ``loss_kwargs``), e.g. ``MemoryBankLoss("triplet", memory_size=4096)`` or in YAML
    ``{name: xbm, kwargs: {loss: hard_negative, memory_size: 4096}}``. A miner's ``indices_tuple`` applies to the
    in-batch term only; the memory term mines with the wrapped loss's own rule (e.g. hardest negative).
    """

    def __init__(
        self,
        loss: nn.Module | str = "triplet",
        memory_size: int = 1024,
        weight: float = 1.0,
        start_step: int = 0,
        loss_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.loss = LOSSES.create(loss, **(loss_kwargs or {})) if isinstance(loss, str) else loss
        if weight < 0 or start_step < 0:
            raise InputError(f"weight and start_step must be >= 0, got {weight} and {start_step}")
        self.memory = MemoryQueue(memory_size)
        self.weight, self.start_step = float(weight), int(start_step)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def step(self) -> None:
        """Advance the start schedule (and the wrapped loss's, if any) by one optimiser step."""
        self.steps_done += 1
        schedule = getattr(self.loss, "step", None)
        if callable(schedule):
            schedule()

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if ref_emb is not None or ref_labels is not None:
            raise InputError("MemoryBankLoss takes its references from the memory; call it without ref_emb")
        inputs = self.prepare_inputs(embeddings, labels)
        value: torch.Tensor = self.loss(inputs.embeddings, inputs.labels, indices_tuple)
        if len(self.memory) and int(self.steps_done) >= self.start_step and self.weight > 0:
            memory = self.loss(
                inputs.embeddings,
                inputs.labels,
                ref_emb=self.memory["embeddings"].to(embeddings),
                ref_labels=self.memory["labels"].to(labels.device),
            )
            value = value + self.weight * memory
        if self.training:
            self.memory.push(embeddings=inputs.embeddings, labels=inputs.labels)
        return value
