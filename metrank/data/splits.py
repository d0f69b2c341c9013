"""Deterministic class-disjoint splits (metric learning tests on classes never seen in training)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metrank.errors import InputError

SPLITS = ("train", "test", "all")


def check_split(split: str, valid: Sequence[str] = SPLITS) -> str:
    if split not in valid:
        raise InputError(f"split must be one of {', '.join(valid)}, got {split!r}")
    return split


def held_out_classes(classes: Sequence[Any], test_fraction: float, seed: int) -> set[Any]:
    """The seeded random ``test_fraction`` of ``classes`` (sorted first, so the order given does not matter)."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ordered = sorted(set(classes))
    n_test = int(round(test_fraction * len(ordered)))
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:n_test]}


def in_split(is_test: bool, split: str) -> bool:
    """Whether an item on the test (``is_test``) or train side belongs to ``split``."""
    return split == "all" or (split == "test") == is_test
