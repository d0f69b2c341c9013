"""The training loop: frozen towers, cached backbone features, trained projection heads.

One loop serves both tasks (``image_text``: paired image/caption features and a ``CrossModalLoss``; ``metric``:
class-labelled image features, a miner and a PML-style loss). Per step: a batch of indices from the batch sampler,
the loss on the heads' L2-normalised embeddings (autocast when ``train.amp``), backward, optional gradient
clipping, optimizer and learning-rate schedule step. Per epoch: Recall@K on the held-out split through
``metrank.metrics``, one log record (JSONL/CSV/TensorBoard/PNG) and the training state (``checkpoints/last.pt``).
At the end, the best and final models are written with ``metrank.encoders.save_checkpoint`` (``model_best.pt``,
``model_final.pt``) so ``metrank.encoders.load_checkpoint`` and the search API load them.

Multi-process: launch with ``torchrun``; the process group is initialised from the environment (gloo on CPU,
NCCL on CUDA), the heads+loss module is DDP-wrapped, samplers give each rank disjoint batches, losses gather the
other ranks' embeddings (global negatives), and only rank 0 writes files.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metrank import distributed
from metrank.errors import InputError
from metrank.training.checkpoint import load_training_state, save_training_state, set_rng_state
from metrank.training.config import TrainConfig, save_config
from metrank.training.feature_sets import LabelFeatures, PairFeatures, label_features, open_dataset, pair_features
from metrank.training.heads import HeadsAndLoss, find_head_parameters
from metrank.training.metrics_log import MetricsLog
from metrank.training.optim import build_optimizer, build_scheduler

# Config keys that may change between an interrupted run and its resume without breaking exactness.
RESUME_FREE_KEYS = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.feature_batch_size",
    "train.device",
    "train.threads",
    "data.fetch",
    "output.",
    "eval.",
)


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]  # last evaluation
    best: dict[str, Any]  # {"metric", "value", "epoch"}
    records: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True  # False when stopped by train.max_steps
    wall_time_s: float = 0.0


def init_distributed(device_kind: str) -> None:
    """Join the process group described by torchrun's environment variables (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise InputError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loss(cfg: TrainConfig) -> tuple:
    """(loss, miner or None); image-text losses are wrapped in ``CrossModalLoss`` (both directions)."""
    from metrank.losses import CrossModalLoss, create_loss

    loss = create_loss(cfg.loss.name, **cfg.loss.kwargs)
    if cfg.task == "image_text":
        loss = CrossModalLoss(loss)
    miner = None
    if cfg.miner.name:
        if cfg.task == "image_text":
            raise InputError("miner.name is only used by task=metric; image-text losses mine inside the batch")
        from metrank.miners import create_miner

        miner = create_miner(cfg.miner.name, **cfg.miner.kwargs)
    return loss, miner


def build_sampler(cfg: TrainConfig, labels: torch.Tensor, embed_train: Any) -> Any:
    """``create_sampler(sampler.name, <labels|ids>=labels, batch_size=..., seed=..., **sampler.kwargs)``.

    The label argument is passed under the name the sampler takes (``labels`` or ``ids``); ``batch_size`` is added
    when the sampler takes one, and a P x K sampler given only ``k`` gets ``p = batch_size // k``; a sampler that
    takes ``embeddings`` (hard batches) gets a callable embedding the training set with the current heads.
    """
    from metrank.samplers import SAMPLERS, create_sampler

    params = inspect.signature(SAMPLERS.get(cfg.sampler.name)).parameters
    kwargs: dict[str, Any] = dict(cfg.sampler.kwargs)
    kwargs["ids" if "ids" in params else "labels"] = labels.numpy()
    kwargs.setdefault("seed", cfg.train.seed)
    if "batch_size" in params:
        kwargs.setdefault("batch_size", cfg.train.batch_size)
    if "p" in params and "p" not in kwargs and "k" in kwargs:
        kwargs["p"] = max(1, cfg.train.batch_size // int(kwargs["k"]))
    if "embeddings" in params:
        kwargs.setdefault("embeddings", embed_train)
    return create_sampler(cfg.sampler.name, **kwargs)


@torch.no_grad()
def embed_features(embed: Any, feats: torch.Tensor, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([embed(feats[i : i + chunk].to(device)).float().cpu() for i in range(0, len(feats), chunk)])


@torch.no_grad()
def evaluate(
    heads: HeadsAndLoss, feats: PairFeatures | LabelFeatures, ks: list[int], device: torch.device
) -> dict[str, float]:
    """Recall@K (and the other metrics ``metrank.metrics`` reports) of the heads on a held-out feature set."""
    from metrank import metrics

    was_training = heads.training
    heads.eval()
    image_emb = embed_features(heads.embed_images, feats.image, device).numpy()
    if isinstance(feats, PairFeatures):
        text_emb = embed_features(heads.embed_texts, feats.text, device).numpy()
        result = metrics.image_text_metrics(
            image_emb,
            text_emb,
            feats.caption_image.numpy(),
            ks=tuple(ks),
            image_labels=feats.image_ids.numpy(),
            progress=False,
        )
    else:
        result = metrics.retrieval_metrics(image_emb, feats.labels.numpy(), ks=tuple(ks), progress=False)
    heads.train(was_training)
    return {k: float(v) for k, v in result.items()}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs" and not key.endswith("kwargs"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    old, new = _flatten(saved), _flatten(current)
    changed = [
        k
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not any(k.startswith(p) for p in RESUME_FREE_KEYS)
    ]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise InputError(
            f"cannot resume exactly: the config changed since the checkpoint ({details}); "
            "resume with the original config or start a new output.dir"
        )


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) training. See the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.train.device)
        init_distributed(self.device.type)
        self.is_main = distributed.rank() == 0
        self.out_dir = Path(cfg.output.dir)
        seed_everything(cfg.train.seed)
        self.loss, self.miner = build_loss(cfg)  # fail fast on bad names

        from metrank.encoders import create_model

        self.model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.kwargs)
        if cfg.task == "image_text" and not getattr(self.model, "has_text", False):
            raise InputError(f"task=image_text needs a two-tower model with a text tower; {cfg.model.name!r} has none")
        self.model.to(self.device).eval()
        make = pair_features if cfg.task == "image_text" else label_features
        self.train_feats = make(
            self.model, open_dataset(cfg, cfg.data.train_split), cfg, cfg.data.train_split, self.device
        )
        self.eval_feats = make(
            self.model, open_dataset(cfg, cfg.data.eval_split), cfg, cfg.data.eval_split, self.device
        )

        if cfg.train.threads is not None:  # for the head-training loop; feature extraction used the default
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # same RNG state at step 1 whether the features were cached or computed
        text_dim = self.train_feats.text.shape[1] if isinstance(self.train_feats, PairFeatures) else None
        names = find_head_parameters(self.model, self.train_feats.image.shape[1], text_dim)
        self.heads = HeadsAndLoss(self.model, names, self.loss, cfg.task, self.miner, cfg.train.feature_dropout)
        self.heads.to(self.device)
        self.module: torch.nn.Module = self.heads
        if distributed.is_distributed():
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.heads,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

        labels = self.train_feats.caption_ids if isinstance(self.train_feats, PairFeatures) else self.train_feats.labels
        self.sampler = build_sampler(
            cfg, labels, lambda: embed_features(self.heads.embed_images, self.train_feats.image, self.device)
        )
        self.sampler.set_epoch(1)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the sampler yields no batch from {len(labels)} training items; lower "
                "train.batch_size (or sampler p/k) or use more data"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.optimizer = build_optimizer(cfg.optim, self.heads.head_parameters(), self.heads.loss_parameters())
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps)
        amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if cfg.train.amp else nullcontext
        self.scaler = (
            torch.amp.GradScaler("cuda")
            if (cfg.train.amp and amp_dtype == torch.float16 and self.device.type == "cuda")
            else None
        )
        self.select = cfg.eval.select or ("rsum" if cfg.task == "image_text" else "R@1")

    # ------------------------------------------------------------------ state
    def _save_state(
        self, epoch: int, step_in_epoch: int, global_step: int, best: dict[str, Any], loss_sum: float, loss_count: int
    ) -> None:
        if self.is_main:
            save_training_state(
                self.out_dir / "checkpoints" / "last.pt",
                trainable=self.heads.trainable_state(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                epoch=epoch,
                step_in_epoch=step_in_epoch,
                global_step=global_step,
                best={**best, "loss_sum": loss_sum, "loss_count": loss_count},
                config=self.cfg.to_dict(),
            )

    def _export(self, name: str, state: dict[str, torch.Tensor] | None, **extra: Any) -> Path:
        """Write the whole model (frozen backbone + heads in ``state``) with ``metrank.encoders.save_checkpoint``."""
        from metrank.encoders import save_checkpoint

        current = self.heads.trainable_state()
        if state is not None:
            self.heads.load_trainable_state(state)
        path = self.out_dir / name
        save_checkpoint(path, self.model, **extra)
        self.heads.load_trainable_state(current)
        return path

    # ------------------------------------------------------------------ loop
    def _batch(self, indices: list[int]) -> tuple:
        idx = torch.as_tensor(indices, dtype=torch.long)
        f = self.train_feats
        if isinstance(f, PairFeatures):
            images = f.caption_image[idx]
            return (f.image[images].to(self.device), f.text[idx].to(self.device), f.image_ids[images].to(self.device))
        return f.image[idx].to(self.device), f.labels[idx].to(self.device)

    def _step(self, indices: list[int]) -> float:
        with self.autocast():
            loss = self.module(*self._batch(indices))
        if not torch.isfinite(loss):
            raise InputError(f"the loss became {loss.item()} (not finite); lower optim.lr or enable train.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.train.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if hasattr(self.loss, "step"):  # loss schedules, e.g. the hard-negative warm-up
            self.loss.step()
        return float(loss.detach())

    def _evaluate(self) -> dict[str, float]:
        return evaluate(self.heads, self.eval_feats, list(self.cfg.eval.ks), self.device)

    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        epoch, skip, global_step = 1, 0, 0
        best: dict[str, Any] = {"metric": self.select, "value": None, "epoch": None, "state": None}
        loss_sum, loss_count = 0.0, 0
        if resume:
            state = load_training_state(state_path(cfg, resume))
            check_resume_config(state["config"], cfg.to_dict())
            self.heads.load_trainable_state(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            epoch, skip, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            best = dict(state["best"])
            loss_sum, loss_count = float(best.pop("loss_sum")), int(best.pop("loss_count"))
            set_rng_state(state["rng"])
        log = (
            MetricsLog(
                self.out_dir,
                resume_epoch=epoch if resume else None,
                tensorboard=cfg.output.tensorboard,
                plot=cfg.output.plot,
            )
            if self.is_main
            else None
        )
        if self.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
        last_metrics: dict[str, float] = {}
        if not resume and cfg.eval.at_start:
            last_metrics = self._evaluate()
            self._log(
                log,
                {
                    "epoch": 0,
                    "step": 0,
                    "loss": None,
                    "lr": self.scheduler.get_last_lr()[0],
                    "time_s": 0.0,
                    **last_metrics,
                },
            )
        completed = True
        while epoch <= cfg.train.epochs:
            self.sampler.set_epoch(epoch)
            self.heads.train()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=skip,
                desc=f"epoch {epoch}/{cfg.train.epochs}",
                disable=not self.is_main,
                leave=False,
                file=sys.stderr,
            )
            for step_in_epoch, indices in enumerate(self.sampler):
                if step_in_epoch < skip:
                    continue
                loss = self._step(indices)
                loss_sum, loss_count, global_step = loss_sum + loss, loss_count + 1, global_step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                every = cfg.train.checkpoint_every
                if cfg.train.max_steps is not None and global_step >= cfg.train.max_steps:
                    self._save_state(epoch, step_in_epoch + 1, global_step, best, loss_sum, loss_count)
                    completed = False
                    break
                if every and global_step % every == 0:
                    self._save_state(epoch, step_in_epoch + 1, global_step, best, loss_sum, loss_count)
            bar.close()
            if not completed:
                break
            record = {
                "epoch": epoch,
                "step": global_step,
                "loss": self._mean_loss(loss_sum, loss_count),
                "lr": self.scheduler.get_last_lr()[0],
                "time_s": round(time.perf_counter() - start, 3),
            }
            if epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs:
                last_metrics = self._evaluate()
                record.update(last_metrics)
                value = last_metrics.get(self.select)
                if value is None:
                    raise InputError(
                        f"eval.select={self.select!r} is not a reported metric; valid: {', '.join(last_metrics)}"
                    )
                if best["value"] is None or value > best["value"]:
                    best = {
                        "metric": self.select,
                        "value": value,
                        "epoch": epoch,
                        "state": self.heads.trainable_state(),
                    }
            self._log(log, record)
            epoch, skip, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            self._save_state(epoch, 0, global_step, best, loss_sum, loss_count)
        if completed and self.is_main:
            summary = {k: v for k, v in best.items() if k != "state"}
            self._export("model_final.pt", None, train_metrics=last_metrics, train_config=cfg.to_dict())
            self._export("model_best.pt", best["state"], train_best=summary, train_config=cfg.to_dict())
        if log is not None:
            log.close()
        records = log.records if log is not None else []
        return TrainResult(
            self.out_dir,
            last_metrics,
            {k: v for k, v in best.items() if k != "state"},
            records,
            completed,
            time.perf_counter() - start,
        )

    def _mean_loss(self, loss_sum: float, loss_count: int) -> float:
        totals = torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64)
        if distributed.is_distributed():
            dist.all_reduce(totals)
        return float(totals[0] / max(totals[1], 1.0))

    def _log(self, log: MetricsLog | None, record: dict[str, Any]) -> None:
        if log is not None:
            log.log(record)


def state_path(cfg: TrainConfig, resume: bool | str | Path) -> Path:
    """The training state ``resume`` refers to: True = ``<output.dir>/checkpoints/last.pt``, else the path given."""
    return Path(cfg.output.dir) / "checkpoints" / "last.pt" if resume is True else Path(resume)


def train(cfg: TrainConfig, resume: bool | str | Path = False) -> TrainResult:
    """Build a :class:`Trainer` from ``cfg`` and run it (``resume``: True = ``<output.dir>/checkpoints/last.pt``).

    A resume checks the state and the config first, before any model or feature is built."""
    if resume:
        check_resume_config(load_training_state(state_path(cfg, resume))["config"], cfg.to_dict())
    return Trainer(cfg).fit(resume)
