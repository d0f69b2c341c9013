"""Batch samplers for metric learning: P x K class batches, no-duplicate caption batches, hard (neighbour) batches.

All are ``torch.utils.data.Sampler`` objects that yield lists of dataset indices (use them as
``DataLoader(dataset, batch_sampler=sampler)``), are deterministic given ``seed`` and the epoch set with
``set_epoch(e)``, and give each DDP rank a disjoint, equally long share of the epoch's batches (rank and world size
default to :mod:`metrank.distributed`). Every rank builds the same global list of batches and keeps every
``world_size``-th one starting at its rank; with ``drop_last=False`` the list is padded by wrapping around so every
rank gets the same number of batches (DDP would hang otherwise).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from metrank import distributed
from metrank.errors import InputError
from metrank.registry import Registry
from metrank.validation import check_embeddings

SAMPLERS: Registry[Sampler] = Registry("sampler")

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


def create_sampler(name: str, **kwargs) -> Sampler:
    """Build a registered batch sampler: "pk", "unique_id" or "hard"."""
    return SAMPLERS.create(name, **kwargs)


def _as_int_array(values: ArrayLike, name: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


class _EpochBatchSampler(Sampler[list[int]]):
    """Shared epoch/rank logic: subclasses implement ``_global_batches(rng) -> list of batches``."""

    def __init__(self, seed: int, rank: int | None, world_size: int | None, drop_last: bool) -> None:
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.rank = distributed.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self._cache: tuple | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose (deterministic) shuffle the next iteration uses; call before each epoch."""
        self.epoch = int(epoch)

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._global_batches(np.random.default_rng([self.seed, self.epoch]))
            if self.world_size > 1 and len(batches) % self.world_size:
                if self.drop_last:
                    batches = batches[: len(batches) - len(batches) % self.world_size]
                else:
                    batches = batches + batches[: self.world_size - len(batches) % self.world_size]
            self._cache = (self.epoch, batches[self.rank :: self.world_size])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())


def _class_groups(items: np.ndarray, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Split one class into ceil(n / k) groups of k distinct items; the last group is topped up from a fresh
    permutation of the items it does not hold yet. Fewer than k items: one group topped up with replacement."""
    n = len(items)
    if n < k:
        return [items.tolist() + rng.choice(items, k - n, replace=True).tolist()]
    order = rng.permutation(items).tolist()
    groups = [order[i : i + k] for i in range(0, n, k)]
    last = groups[-1]
    if len(last) < k:
        others = rng.permutation(np.setdiff1d(items, last)).tolist()
        last.extend(others[: k - len(last)])
    return groups


def _pick_largest(candidates: np.ndarray, remaining: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The ``count`` candidates with the most groups left (ties broken at random)."""
    keys = remaining[candidates] + rng.random(len(candidates)) * 0.5
    if count >= len(candidates):
        return candidates[np.argsort(-keys)]
    top = np.argpartition(-keys, count - 1)[:count]
    return candidates[top[np.argsort(-keys[top])]]


@SAMPLERS.register("pk")
class PKBatchSampler(_EpochBatchSampler):
    """P classes x K samples per batch, with a real epoch.

    Each epoch, every class is split into ceil(n_c / K) groups of K distinct items (items shuffled and cycled
    without replacement; a class with fewer than K items is sampled with replacement, or raises ``ValueError``
    when ``allow_replacement=False``). Batches take one group from each of P distinct classes, always from the
    classes with the most groups left (random tie-break): on balanced data every class is visited once per pass
    and every item once per epoch. Groups that cannot fill a batch of P distinct classes at the end of the epoch
    are dropped (``drop_last=True``) or yielded as smaller batches.

    Hierarchical mode (``super_labels``, one per item, e.g. SOP super-categories): each batch draws a super-class
    at random (weighted by its groups left) and takes its P classes from it, topping up from further super-classes
    only when it has fewer than P classes left, so batches hold hard negatives from few super-classes.
    """

    def __init__(
        self,
        labels: ArrayLike,
        p: int,
        k: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
        super_labels: ArrayLike | None = None,
        allow_replacement: bool = True,
    ) -> None:
        super().__init__(seed, rank, world_size, drop_last)
        self.labels = _as_int_array(labels, "labels")
        if p < 1 or k < 1:
            raise InputError(f"p and k must be >= 1, got p={p}, k={k}")
        self.p, self.k = int(p), int(k)
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        if len(self.classes) < self.p:
            raise InputError(f"p={p} classes per batch but the labels hold only {len(self.classes)} classes")
        order = np.argsort(inverse, kind="stable")
        self.class_items = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        small = [int(self.classes[c]) for c, items in enumerate(self.class_items) if len(items) < self.k]
        if small and not allow_replacement:
            raise InputError(
                f"{len(small)} class(es) have fewer than k={k} items (e.g. {small[:10]}); "
                f"pass allow_replacement=True to sample them with replacement, lower k, or drop them"
            )
        self.class_super: np.ndarray | None = None
        if super_labels is not None:
            sup = _as_int_array(super_labels, "super_labels")
            if len(sup) != len(self.labels):
                raise InputError(f"super_labels has length {len(sup)} but labels has {len(self.labels)}")
            self.class_super = np.array([sup[items[0]] for items in self.class_items])
            mixed = [int(self.classes[c]) for c, items in enumerate(self.class_items) if len(set(sup[items])) > 1]
            if mixed:
                raise InputError(f"classes {mixed[:10]} span several super-classes; each class needs one super-label")

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        groups = [_class_groups(items, self.k, rng) for items in self.class_items]
        remaining = np.array([len(g) for g in groups])
        batches = []
        while remaining.any():
            alive = np.flatnonzero(remaining)
            if len(alive) < self.p and self.drop_last:
                break
            chosen = self._choose(alive, remaining, rng)
            batches.append([i for c in chosen for i in groups[c][len(groups[c]) - remaining[c]]])
            remaining[chosen] -= 1
        return batches

    def _choose(self, alive: np.ndarray, remaining: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.class_super is None:
            return _pick_largest(alive, remaining, self.p, rng)
        chosen: list[np.ndarray] = []
        left = alive
        while sum(map(len, chosen)) < self.p and len(left):
            supers = np.unique(self.class_super[left])
            weights = np.array([remaining[left[self.class_super[left] == s]].sum() for s in supers], dtype=float)
            sup = rng.choice(supers, p=weights / weights.sum())
            in_sup = left[self.class_super[left] == sup]
            chosen.append(_pick_largest(in_sup, remaining, self.p - sum(map(len, chosen)), rng))
            left = left[self.class_super[left] != sup]
        return np.concatenate(chosen)


@SAMPLERS.register("unique_id")
class UniqueIdBatchSampler(_EpochBatchSampler):
    """Batches of ``batch_size`` captions with never two captions of the same image (``ids``) in one batch.

    Each epoch, round r holds the r-th caption (shuffled) of every image that has more than r captions; rounds are
    shuffled and concatenated, then cut into batches, and a caption whose image is already in the batch being
    filled is deferred to the next batch. Every caption is seen once per epoch except, with ``drop_last=True``,
    the captions of the final incomplete batch(es) - fewer than ``batch_size`` plus the deferred captions of images
    with more captions than the rest (with ``drop_last=False`` they come as smaller batches).
    """

    def __init__(
        self,
        ids: ArrayLike,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__(seed, rank, world_size, drop_last)
        self.ids = _as_int_array(ids, "ids")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        _, inverse = np.unique(self.ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.id_items = np.split(order, np.cumsum(np.bincount(inverse))[:-1])

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        per_id = [rng.permutation(items) for items in self.id_items]
        rounds: dict[int, list[int]] = {}
        for captions in per_id:
            for r, c in enumerate(captions.tolist()):
                rounds.setdefault(r, []).append(c)
        stream = iter([c for r in sorted(rounds) for c in rng.permutation(rounds[r]).tolist()])
        pending: deque = deque()
        batches: list[list[int]] = []
        exhausted = False
        while True:
            batch: list[int] = []
            used = set()
            for _ in range(len(pending)):
                c = pending.popleft()
                if len(batch) < self.batch_size and self.ids[c] not in used:
                    batch.append(c)
                    used.add(self.ids[c])
                else:
                    pending.append(c)
            while len(batch) < self.batch_size and not exhausted:
                c = next(stream, None)
                if c is None:
                    exhausted = True
                elif self.ids[c] in used:
                    pending.append(c)
                else:
                    batch.append(c)
                    used.add(self.ids[c])
            if not batch or (len(batch) < self.batch_size and self.drop_last):
                return batches
            batches.append(batch)


@SAMPLERS.register("hard")
class HardBatchSampler(_EpochBatchSampler):
    """P x K batches whose P classes are neighbours in embedding space (hard negatives), refreshed during training.

    Class centroids (mean of the L2-normalised embeddings of each class, renormalised) define the neighbourhoods.
    Each batch takes a random seed class not yet visited in the current pass and its P - 1 nearest unvisited
    classes (cosine, torch k-NN); a pass ends when fewer than P classes are unvisited. Items of a class are cycled
    without replacement across batches (with replacement below K items). An epoch has
    ``sum_c ceil(n_c / K) // P`` global batches. Call ``update(embeddings)`` with fresh embeddings of the whole
    dataset (the same on every rank) to recompute the neighbourhoods; with ``embeddings_fn`` the sampler calls it
    itself every ``refresh_every`` batches of the global sequence. Batches are built lazily, so updates take
    effect for the following batches.
    """

    def __init__(
        self,
        embeddings: np.ndarray | torch.Tensor | Callable[[], np.ndarray | torch.Tensor],
        labels: ArrayLike,
        p: int,
        k: int,
        refresh_every: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__(seed, rank, world_size, drop_last)
        self.labels = _as_int_array(labels, "labels")
        if p < 2 or k < 1:
            raise InputError(f"need p >= 2 classes and k >= 1 samples per batch, got p={p}, k={k}")
        self.p, self.k = int(p), int(k)
        if refresh_every is not None and refresh_every < 1:
            raise InputError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        self.refresh_every = refresh_every
        self.embeddings_fn = embeddings if callable(embeddings) else None
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        if len(self.classes) < self.p:
            raise InputError(f"p={p} classes per batch but the labels hold only {len(self.classes)} classes")
        self._inverse = torch.from_numpy(inverse)
        order = np.argsort(inverse, kind="stable")
        self.class_items = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        self.update(self.embeddings_fn() if self.embeddings_fn is not None else embeddings)  # type: ignore[arg-type]

    def update(self, embeddings: np.ndarray | torch.Tensor) -> None:
        """Recompute the class centroids from fresh embeddings [n_items, dim] (row i = dataset item i)."""
        x = torch.as_tensor(embeddings).detach().float().cpu()
        if x.ndim != 2 or x.shape[0] != len(self.labels):
            raise InputError(f"embeddings must have shape ({len(self.labels)}, dim), got {tuple(x.shape)}")
        check_embeddings(x, "embeddings")
        x = torch.nn.functional.normalize(x, dim=1)
        sums = torch.zeros(len(self.classes), x.shape[1]).index_add_(0, self._inverse, x)
        self.centroids = torch.nn.functional.normalize(sums, dim=1)

    def nearest_classes(self, seed_class: int, allowed: torch.Tensor, count: int) -> list[int]:
        """Positions (in ``self.classes``) of the ``count`` allowed classes closest to ``seed_class``."""
        sims = self.centroids @ self.centroids[seed_class]
        sims[~allowed] = -float("inf")
        return sims.topk(count).indices.tolist()

    def __len__(self) -> int:
        total = sum(-(-len(items) // self.k) for items in self.class_items) // self.p
        if self.world_size > 1:
            total = total // self.world_size if self.drop_last else -(-total // self.world_size)
        return total

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        cursors = [deque(rng.permutation(items).tolist()) for items in self.class_items]
        unvisited = torch.ones(len(self.classes), dtype=torch.bool)
        n_global = len(self) * self.world_size
        for b in range(n_global):
            if self.embeddings_fn is not None and self.refresh_every and b and b % self.refresh_every == 0:
                self.update(self.embeddings_fn())
            if int(unvisited.sum()) < self.p:
                unvisited[:] = True
            seed_class = int(rng.choice(torch.nonzero(unvisited).flatten().numpy()))
            unvisited[seed_class] = False
            chosen = [seed_class] + self.nearest_classes(seed_class, unvisited, self.p - 1)
            unvisited[chosen] = False
            batch = [i for c in chosen for i in self._take(c, cursors, rng)]
            if b % self.world_size == self.rank:
                yield batch

    def _take(self, c: int, cursors: list[deque], rng: np.random.Generator) -> list[int]:
        items = self.class_items[c]
        if len(items) < self.k:
            return items.tolist() + rng.choice(items, self.k - len(items), replace=True).tolist()
        out: list[int] = []
        while len(out) < self.k:
            if not cursors[c]:
                cursors[c].extend(x for x in rng.permutation(items).tolist() if x not in out)
            out.append(cursors[c].popleft())
        return out
