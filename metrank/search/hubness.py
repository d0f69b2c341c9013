"""Query-time hubness correction: re-score ``s(q, g)`` with a per-gallery-item bias estimated from a query bank.

In high-dimensional cross-modal retrieval a few gallery items ("hubs") are the nearest neighbour of very many
queries. Both corrections here compare each gallery item ``g`` against a bank ``B`` of reference queries (e.g. the
training captions) and subtract a bias, so they work incrementally (a new item's bias needs only its own vector)
and exactly on top of any FAISS index (see ``Retriever.search``):

- **QB-Norm with dynamic inverted softmax** (Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation",
  CVPR 2022). Inverted softmax ``IS(q, g) = exp(β s(q,g)) / Σ_{b∈B} exp(β s(b,g))`` ranks exactly as
  ``s(q,g) − bias(g)`` with ``bias(g) = (1/β) log Σ_b exp(β s(b,g))``. *Dynamic*: a query is normalised only when
  its raw top-1 gallery item lies in the activation set ``A = {argmax_g s(b, g) : b ∈ B}`` (the items that are
  some bank query's top-1); otherwise the raw similarities are kept.
- **NNN, Nearest Neighbor Normalization** (Chowdhury et al., EMNLP 2024):
  ``s'(q, g) = s(q, g) − α · mean(top-k_{b∈B} s(b, g))``, applied to every query.

``score`` returned for corrected hits is ``s − bias``, in similarity units (for QB-Norm its order is the inverted
softmax's order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from metrank.errors import InputError
from metrank.registry import Registry
from metrank.validation import check_embeddings

HUBNESS: Registry[HubnessCorrection] = Registry("hubness correction")
_CHUNK = 4096


class HubnessCorrection:
    """Base class: a per-item bias from the item's similarities to the query bank, optionally gated per query."""

    name = ""
    gated = False

    def item_bias(self, bank_sims: np.ndarray) -> np.ndarray:
        """``bank_sims`` [n_items, n_bank] -> bias [n_items] (float64)."""
        raise NotImplementedError

    def params(self) -> dict[str, float]:
        raise NotImplementedError


@HUBNESS.register("qb_norm")
class QBNorm(HubnessCorrection):
    """Dynamic inverted softmax: ``bias(g) = (1/β)·log Σ_b exp(β·s(b, g))``, applied only when the query's raw top-1
    item is in the bank's top-1 activation set."""

    name = "qb_norm"
    gated = True

    def __init__(self, beta: float = 20.0) -> None:
        if not beta > 0:
            raise InputError(f"QB-Norm temperature beta must be > 0, got {beta}")
        self.beta = float(beta)

    def item_bias(self, bank_sims: np.ndarray) -> np.ndarray:
        z = self.beta * bank_sims.astype(np.float64)
        peak = z.max(axis=1, keepdims=True)
        return (peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1))) / self.beta

    def params(self) -> dict[str, float]:
        return {"beta": self.beta}


@HUBNESS.register("nnn")
class NNN(HubnessCorrection):
    """Nearest Neighbor Normalization: ``bias(g) = α · mean of the k largest s(b, g) over bank queries b``."""

    name = "nnn"
    gated = False

    def __init__(self, alpha: float = 0.75, k: int = 16) -> None:
        if not 0 <= alpha:
            raise InputError(f"NNN alpha must be >= 0, got {alpha}")
        if int(k) < 1:
            raise InputError(f"NNN k must be >= 1, got {k}")
        self.alpha = float(alpha)
        self.k = int(k)

    def item_bias(self, bank_sims: np.ndarray) -> np.ndarray:
        k = min(self.k, bank_sims.shape[1])
        top = np.partition(bank_sims, bank_sims.shape[1] - k, axis=1)[:, -k:]
        return self.alpha * top.astype(np.float64).mean(axis=1)

    def params(self) -> dict[str, float]:
        return {"alpha": self.alpha, "k": self.k}


def create_hubness(name: str, **kwargs) -> HubnessCorrection:
    """``create_hubness("qb_norm", beta=20)`` or ``create_hubness("nnn", alpha=0.75, k=16)``."""
    return HUBNESS.create(name, **kwargs)


class HubnessState:
    """A correction plus its bank and what it knows about the gallery: each item's bias and each bank query's top-1.

    Items are registered with :meth:`add_items` as they enter the gallery; :meth:`remove_items` reports the bank
    queries whose top-1 left, which the owner re-searches and passes to :meth:`set_top1`. ``modality`` (None = all)
    names the gallery items the correction covers; other items keep bias 0 and never enter the activation set.
    """

    def __init__(self, correction: HubnessCorrection, bank: np.ndarray, modality: str | None = None) -> None:
        check_embeddings(bank, "query bank")
        self.correction = correction
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.modality = modality
        self._bias: dict[int, float] = {}
        self.top1_score = np.full(len(bank), -np.inf, dtype=np.float64)
        self.top1_id = np.full(len(bank), -1, dtype=np.int64)

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def __len__(self) -> int:
        return len(self._bias)

    def add_items(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        id_array = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(id_array), _CHUNK):
            sims = vectors[start : start + _CHUNK].astype(np.float32) @ self.bank.T  # [n, B]
            bias = self.correction.item_bias(sims)
            self._bias.update(zip(id_array[start : start + _CHUNK].tolist(), bias.tolist()))
            best = sims.argmax(axis=0)
            best_score = sims[best, np.arange(sims.shape[1])]
            better = best_score > self.top1_score
            self.top1_score[better] = best_score[better]
            self.top1_id[better] = id_array[start : start + _CHUNK][best[better]]

    def remove_items(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Forget ``ids``; returns the indices of bank queries whose top-1 was removed (to re-search)."""
        for i in ids:
            self._bias.pop(int(i), None)
        stale = np.flatnonzero(np.isin(self.top1_id, np.asarray(ids, dtype=np.int64)))
        self.top1_score[stale] = -np.inf
        self.top1_id[stale] = -1
        return stale

    def set_top1(self, bank_rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        self.top1_score[bank_rows] = np.where(ids >= 0, scores, -np.inf)
        self.top1_id[bank_rows] = ids

    def bias(self, ids: np.ndarray) -> np.ndarray:
        """Bias per id (0 for ids the correction does not cover, including -1 padding)."""
        get = self._bias.get
        return np.fromiter(
            (get(int(i), 0.0) for i in np.asarray(ids).ravel()), dtype=np.float64, count=np.asarray(ids).size
        ).reshape(np.shape(ids))

    def min_bias(self) -> float:
        """The smallest bias of any item (0 when some items are uncovered): unfetched items score at most
        ``s_last − min_bias``."""
        return min(self._bias.values(), default=0.0)

    def applies(self, raw_top1_ids: np.ndarray) -> np.ndarray:
        """Per query: apply the correction? (always for ungated corrections; QB-Norm: top-1 in activation set)."""
        raw_top1_ids = np.asarray(raw_top1_ids, dtype=np.int64)
        if not self.correction.gated:
            return np.ones(len(raw_top1_ids), dtype=bool)
        return np.isin(raw_top1_ids, self.top1_id[self.top1_id >= 0])

    def describe(self) -> dict[str, object]:
        return {
            "method": self.correction.name,
            **self.correction.params(),
            "bank_size": len(self.bank),
            "modality": self.modality,
            "covered_items": len(self._bias),
            "activation_set": int(np.unique(self.top1_id[self.top1_id >= 0]).size),
        }

    # ----------------------------------------------------------------------------------------------- persistence
    def save(self, directory: str) -> None:
        """Write ``hubness.json`` + ``hubness.npz`` into ``directory`` (a fresh snapshot dir)."""
        ids = np.fromiter(self._bias.keys(), dtype=np.int64, count=len(self._bias))
        bias = np.fromiter(self._bias.values(), dtype=np.float64, count=len(self._bias))
        with open(os.path.join(directory, "hubness.npz"), "wb") as f:
            np.savez(f, bank=self.bank, ids=ids, bias=bias, top1_score=self.top1_score, top1_id=self.top1_id)
        with open(os.path.join(directory, "hubness.json"), "w") as f:
            json.dump(
                {"method": self.correction.name, "params": self.correction.params(), "modality": self.modality}, f
            )

    @classmethod
    def load(cls, directory: str) -> HubnessState | None:
        if not os.path.exists(os.path.join(directory, "hubness.json")):
            return None
        with open(os.path.join(directory, "hubness.json")) as f:
            info = json.load(f)
        data = np.load(os.path.join(directory, "hubness.npz"))
        state = cls(create_hubness(info["method"], **info["params"]), data["bank"], info["modality"])
        state._bias = dict(zip(data["ids"].tolist(), data["bias"].tolist()))
        state.top1_score, state.top1_id = data["top1_score"].copy(), data["top1_id"].copy()
        return state
