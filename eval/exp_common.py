"""Shared pieces of the loss experiments (``eval/exp_label_noise.py``, ``eval/exp_cprd_vs_kd.py``): frozen features
from the training feature cache, seeded small heads, mean ± std tables in markdown and their plots.

Features are computed once per (model, dataset, split) with :mod:`metrank.encoders` through the training feature
cache (``~/.cache/metrank/features``), so every run of an experiment trains heads only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metrank.atomic import atomic_write_text
from metrank.training import load_config
from metrank.training.feature_sets import label_features, open_dataset, pair_features

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


def frozen_features(config: str, overrides: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """(cfg, train features, test features) of a training config (path relative to the repository root), from the
    feature cache or computed once."""
    from metrank.encoders import create_model

    cfg = load_config(str(ROOT / config), list(overrides))
    device = torch.device("cpu")
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.kwargs).eval()
    load = label_features if cfg.task == "metric" else pair_features
    out = []
    for split in (cfg.data.train_split, cfg.data.eval_split):
        out.append(load(model, open_dataset(cfg, split), cfg, split, device))
    return cfg, out[0], out[1]


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std over seeds) in the values' unit, one decimal."""
    arr = np.asarray(values, dtype=np.float64)
    std = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.1f} ± {std:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(f"wrote {path}")


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
