"""The frozen baselines (metrank.training.baselines): the ridge map against an independent least-squares solve, and
the baseline rows of a tiny real config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metrank.training import load_config
from metrank.training.baselines import frozen_baselines, ridge_map, ridge_transfer

REPO = Path(__file__).resolve().parents[1]


def test_ridge_map_equals_least_squares_on_the_augmented_system():
    rng = np.random.default_rng(0)
    x, y, lam = rng.standard_normal((40, 6)), rng.standard_normal((40, 3)), 2.5
    # ridge = ordinary least squares on [x; sqrt(lam) I] -> [y; 0]
    augmented_x = np.vstack([x, np.sqrt(lam) * np.eye(6)])
    augmented_y = np.vstack([y, np.zeros((6, 3))])
    reference = np.linalg.lstsq(augmented_x, augmented_y, rcond=None)[0]
    np.testing.assert_allclose(ridge_map(x, y, lam), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.data
def test_ridge_baseline_and_its_transfer_on_a_tiny_config(tmp_path):
    cfg = load_config(REPO / "train" / "configs" / "tiny_emoji_image_text.yaml", [f"output.cache_dir={tmp_path}"])
    rows = frozen_baselines(cfg)
    ((name, metrics),) = rows.items()
    assert name.startswith("frozen ridge (lambda=") and 0 < metrics["rsum"] <= 600
    # transfer to the same data = the baseline itself (same map, same test split)
    assert ridge_transfer(cfg, cfg)["rsum"] == pytest.approx(metrics["rsum"])
