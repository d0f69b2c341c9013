"""Ray Train launcher: ``TorchTrainer`` runs metrank's own DDP trainer (``metrank.training.trainer.train``) unchanged.

Each of the ``num_workers`` Ray Train workers joins the process group Ray sets up (gloo on CPU, NCCL on GPUs) and
runs exactly what ``torchrun`` would run: metrank's rank-disjoint samplers (not Ray's ``prepare_data_loader``, which
would swap in a ``DistributedSampler``), global negatives through ``metrank.distributed``, rank 0 writing the outputs.
With the same config and seed the weights equal a ``torchrun`` run with as many processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrank.errors import InputError, StateError
from metrank.scale.cluster import check_gpus, connect
from metrank.training.config import load_config
from metrank.training.trainer import train as train_locally


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the same call as ``metrank train`` under torchrun."""

    train_locally(load_config(config["config"], config["overrides"]), resume=config["resume"])


def train(
    config: str,
    overrides: Sequence[str] = (),
    num_workers: int = 2,
    use_gpu: bool = False,
    resume: bool | str = False,
    storage_path: str | None = None,
) -> Path:
    """Train ``config`` (+ ``key=value`` overrides) on ``num_workers`` Ray Train workers (one GPU each with
    ``use_gpu``); returns the output folder. Relative paths (config, ``output.dir``, ``output.cache_dir``) are
    resolved here, on the driver, because Ray Train workers run in their own working directories."""

    if num_workers < 1:
        raise InputError(f"the number of Ray workers must be >= 1, got {num_workers}")
    cfg = load_config(config, list(overrides))
    resolved = [*overrides, f"output.dir={os.path.abspath(cfg.output.dir)}"]
    if cfg.output.cache_dir:
        resolved.append(f"output.cache_dir={os.path.abspath(cfg.output.cache_dir)}")
    connect()
    if use_gpu:
        check_gpus(num_workers)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": os.path.abspath(config),
            "overrides": resolved,
            "resume": os.path.abspath(resume) if isinstance(resume, str) else resume,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage_path or os.path.join(os.path.abspath(cfg.output.dir), "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise StateError(f"Ray Train run failed: {result.error}")
    return Path(os.path.abspath(cfg.output.dir))
