"""Pairs of embeddings: the validated inputs of every loss and miner, label masks and distance matrices.

Conventions (pytorch-metric-learning, "PML"): anchors are the rows of ``embeddings``; positives and negatives are
rows of ``ref_emb``. Without ``ref_emb`` the reference set is ``embeddings`` itself and the self-pair ``(i, i)`` is
neither a positive nor a negative; an explicit ``ref_emb`` (even the same tensor) is a separate reference set, so
``(i, i)`` is compared like any other pair. All losses take L2-normalised embeddings; ``S = embeddings @ ref_embᵀ``
is the cosine similarity. Losses (``metrank.losses``) and miners (``metrank.miners``) both build on this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning import distances as pml_distances
from torch import nn

from metrank import validation
from metrank.errors import InputError
from metrank.validation import check_choice, check_embeddings, check_labels

IndicesTuple = tuple[torch.Tensor, ...]
DISTANCES = ("euclidean", "cosine")


@dataclass
class LossInputs:
    """Validated loss inputs; ``self_ref`` is True when the reference set is the anchor set itself."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    ref_emb: torch.Tensor
    ref_labels: torch.Tensor
    self_ref: bool


def check_normalized(x: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    """Raise ``InputError`` unless every row of ``x`` has unit L2 norm (1e-3 tolerance, 1e-2 for 16-bit floats)."""
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
    norms = x.detach().float().norm(dim=1)
    bad = ((norms - 1).abs() > tol).nonzero().flatten()
    if bad.numel():
        raise InputError(
            f"{name} must be L2-normalised (rows {bad[:5].tolist()} have norms "
            f"{norms[bad[:5]].tolist()}); apply torch.nn.functional.normalize(x, dim=1) first"
        )
    return x


def check_unit_embeddings(x: torch.Tensor, name: str, dim: int | None = None, values: bool = True) -> None:
    """A 2-D float tensor of L2-normalised rows; ``values=False`` checks only shape and dtype (no device sync)."""
    check_embeddings(x, name, dim=dim, values=values)
    if values:
        check_normalized(x, name)


def check_label_tensor(labels: torch.Tensor, n: int, name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor, got {type(labels).__name__}")
    check_labels(labels, n, name)


def prepare_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    values: bool = True,
) -> LossInputs:
    """Validate PML-convention inputs (normalised floats, finite unless ``values=False``; integer labels of
    matching length)."""
    check_unit_embeddings(embeddings, "embeddings", values=values)
    check_label_tensor(labels, embeddings.shape[0], "labels")
    if ref_emb is None:
        if ref_labels is not None and ref_labels is not labels and not torch.equal(ref_labels, labels):
            raise InputError("ref_labels was given without ref_emb; pass ref_emb too or drop ref_labels")
        return LossInputs(embeddings, labels, embeddings, labels, True)
    check_unit_embeddings(ref_emb, "ref_emb", dim=embeddings.shape[1], values=values)
    if ref_labels is None:
        raise InputError("ref_emb needs ref_labels (the label of every reference row)")
    check_label_tensor(ref_labels, ref_emb.shape[0], "ref_labels")
    return LossInputs(embeddings, labels, ref_emb, ref_labels, False)


def check_pairs(image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor, values: bool = True) -> None:
    """Row ``i`` of ``image_emb`` and ``text_emb`` is a matching pair with id ``ids[i]``."""
    check_unit_embeddings(image_emb, "image_emb", values=values)
    check_unit_embeddings(text_emb, "text_emb", dim=image_emb.shape[1], values=values)
    if text_emb.shape[0] != image_emb.shape[0]:
        raise InputError(
            f"image_emb has {image_emb.shape[0]} rows but text_emb has {text_emb.shape[0]}; "
            "row i of both must be a matching pair"
        )
    check_label_tensor(ids, image_emb.shape[0], "ids")


class ChecksInputs(nn.Module):
    """Base of every loss and miner: validates its inputs, reading their values (finite, unit norm: a device sync)
    on the first call and under :func:`metrank.validation.set_debug_checks`, shapes and dtypes always."""

    def __init__(self) -> None:
        super().__init__()
        self._values_checked = False

    def prepare_inputs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> LossInputs:
        inputs = prepare_inputs(embeddings, labels, ref_emb, ref_labels, values=self._read_values())
        self._values_checked = True
        return inputs

    def check_pairs(self, image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor) -> None:
        check_pairs(image_emb, text_emb, ids, values=self._read_values())
        self._values_checked = True

    def _read_values(self) -> bool:
        return validation.debug_checks() or not self._values_checked


def similarity_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``S = x yᵀ`` of L2-normalised rows."""
    return x @ y.t()


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖x_i − y_j‖² = 2 − 2 S_ij`` for L2-normalised rows, clamped at 0 against rounding."""
    return (2 - 2 * similarity_matrix(x, y)).clamp_min(0)


def pml_distance(name: str) -> pml_distances.BaseDistance:
    """The PML distance object for ``"euclidean"`` (L2, no re-normalisation) or ``"cosine"`` (cosine similarity)."""
    check_choice(name, DISTANCES, "distance")
    if name == "euclidean":
        return pml_distances.LpDistance(normalize_embeddings=False, p=2, power=1)
    return pml_distances.CosineSimilarity()


def ranking_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """A B×M matrix that is small for close pairs, used for mining.

    ``"euclidean"`` is ``torch.cdist`` (exactly what PML's ``LpDistance`` computes); ``"cosine"`` is the negated
    similarity ``−S``, which orders pairs and measures margins exactly like the cosine distance ``1 − S``.
    """
    check_choice(distance, DISTANCES, "distance")
    return torch.cdist(x, y) if distance == "euclidean" else -similarity_matrix(x, y)


def label_masks(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean B×M masks ``(positive, negative)`` from ``labels`` vs ``ref_labels``; self-pairs excluded."""
    pos = inputs.labels[:, None] == inputs.ref_labels[None, :]
    neg = ~pos
    if inputs.self_ref:
        pos.fill_diagonal_(False)
    return pos, neg


def pair_masks(inputs: LossInputs, indices_tuple: IndicesTuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive/negative masks from labels, or restricted to the pairs of a miner's ``indices_tuple``.

    ``(a, p, n)`` and ``(a1, p, a2, n)`` give both masks; ``(a, n)`` (e.g. ``topk_hardest``) keeps the label
    positives and restricts the negatives to the given pairs.
    """
    pos, neg = label_masks(inputs)
    if indices_tuple is None:
        return pos, neg
    if len(indices_tuple) == 2:
        a, n = indices_tuple
        mined_neg = torch.zeros_like(neg)
        mined_neg[a, n] = True
        return pos, neg & mined_neg
    if len(indices_tuple) == 3:
        a1, p, n = indices_tuple
        a2 = a1
    elif len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
    else:
        raise InputError(f"indices_tuple must have 2, 3 or 4 index tensors, got {len(indices_tuple)}")
    mined_pos, mined_neg = torch.zeros_like(pos), torch.zeros_like(neg)
    mined_pos[a1, p] = True
    mined_neg[a2, n] = True
    return pos & mined_pos, neg & mined_neg


def topk_distinct(scores: torch.Tensor, allowed: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the columns of the ``k`` highest ``scores`` among the ``allowed`` ones, at most one per group.

        ``scores`` and ``allowed`` are n×M, ``groups`` (M,) assigns every column to a group (e.g. the image id of each
        reference row, so one image duplicated in a batch fills one slot, not several). Each group is represented by its
        highest-scoring allowed column (the lowest index on ties; tied groups in ascending group order, so with one group
    per column ties keep column order). Returns n×k column indices, best first. Raises
        ``InputError`` when some row has fewer than ``k`` allowed groups.
    """
    n, m = scores.shape
    inverse = groups.unique(return_inverse=True)[1].to(scores.device).expand(n, m)
    n_groups = int(inverse.max()) + 1 if m else 0
    masked = scores.masked_fill(~allowed, float("-inf"))
    best = masked.new_full((n, n_groups), float("-inf")).scatter_reduce(1, inverse, masked, "amax")
    fewest = int((best > float("-inf")).sum(1).min()) if n else k
    if fewest < k:
        raise InputError(
            f"need k={k} distinct negatives per query but some query has only {fewest} among {m} reference rows; "
            "lower k or use a larger batch or memory queue"
        )
    columns = torch.arange(m, device=scores.device).expand(n, m)
    is_best = allowed & (masked == best.gather(1, inverse))
    first = torch.full((n, n_groups), m, device=scores.device).scatter_reduce(
        1, inverse, columns.masked_fill(~is_best, m), "amin"
    )
    return first.gather(1, best.sort(dim=1, descending=True, stable=True).indices[:, :k])
