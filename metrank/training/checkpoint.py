"""The training state (weights, optimizer, schedule, loss parameters, RNG, position).

The training state is what ``--resume`` needs to continue *exactly*: restoring it and replaying the remaining steps
gives bit-identical weights to an uninterrupted run (the batch order of an epoch is a function of (seed, epoch), the
position inside the epoch is stored, and every random number generator is restored).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metrank.atomic import atomic_torch_save, load_torch_file
from metrank.errors import MissingFileError, StateError


def rng_state() -> dict[str, Any]:
    """The state of every random number generator training touches, as tensors/lists (``weights_only``-loadable)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    best: dict[str, Any],
    config: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the full training state atomically.

    ``trainable`` is the state of the trainable heads *and* the loss (so loss parameters such as the InfoNCE logit
    scale are saved with it; the frozen backbone is rebuilt from the model config). ``epoch``/``step_in_epoch`` is
    the position of the next batch to run.
    """
    atomic_torch_save(
        {
            "format": "metrank-train-state-v1",
            "module": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "best": best,
            "config": config,
            "ema": ema,
        },
        path,
    )


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no training state to resume from at {str(path)!r}; run without --resume first")
    state = load_torch_file(path, "training state")
    if not isinstance(state, dict) or state.get("format") != "metrank-train-state-v1":
        raise StateError(f"{str(path)!r} is not a metrank training state (written by metrank.training)")
    return state
