"""The training loop: one loop for every tower mode (heads / last_n / lora / full) and every loss.

One loop serves both tasks (``image_text``: paired image/caption rows and a paired loss, pairwise losses wrapped in
``CrossModalLoss``; ``metric``: class-labelled images, a miner and a pairwise loss). What a tower trains on (cached
features, a cached frozen prefix, raw images or tokens) is set per tower in the config (:mod:`metrank.training.towers`).
Per step: a batch of row indices from the batch sampler, the loss on the L2-normalised embeddings (autocast when
``train.amp``; chunked with GradCache when ``train.grad_cache``), backward, optional clipping, optimizer and schedule
step every ``train.accumulate`` batches, optional EMA. Per epoch: Recall@K on the *validation* split (identities
carved from the training split, ``data.val_fraction``), which picks ``model_best.pt``, and on a probe of as many
training identities (``eval.train_probe``, logged as ``train_<metric>``: train vs held-out curves); the test split is
evaluated once at the end, for the best and the last model. With ``data.captions_per_image`` the sampler draws
caption slots whose captions are redrawn every epoch (:mod:`metrank.training.caption_sampling`). Files: one log
record per epoch (JSONL/CSV/TensorBoard/PNG), the training state (``checkpoints/last.pt``), ``model_best.pt`` /
``model_final.pt`` written with ``metrank.encoders.save_checkpoint`` (``load_checkpoint`` and the search API load
them).

Multi-process: launch with ``torchrun``; the process group is initialised from the environment (gloo on CPU,
NCCL on CUDA), the train module is DDP-wrapped (with GradCache the gradients are all-reduced by hand), samplers give
each rank disjoint batches, losses gather the other ranks' embeddings (global negatives), and only rank 0 writes.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metrank import distributed, metrics
from metrank.distributed import resolve_device
from metrank.encoders import create_model, save_checkpoint
from metrank.encoders.tuning import (
    apply_tuning,
    block_split,
    lora_settings,
    require_split,
    tower_backbone,
    trainable_parameter_names,
)
from metrank.errors import ConfigError, InputError
from metrank.losses import LOSSES, CrossModalLoss, create_loss, is_paired
from metrank.miners import create_miner
from metrank.samplers import SAMPLERS, create_sampler
from metrank.training.caption_sampling import CaptionSlots
from metrank.training.checkpoint import load_training_state, save_training_state, set_rng_state
from metrank.training.config import TowerConfig, TrainConfig, save_config
from metrank.training.feature_cache import cached, feature_cache_key, image_fingerprint, text_fingerprint
from metrank.training.feature_sets import (
    Selection,
    cached_image_features,
    cached_text_features,
    carve_validation,
    open_dataset,
    select_rows,
)
from metrank.training.gradcache import grad_cache_backward
from metrank.training.metrics_log import MetricsLog
from metrank.training.optim import build_optimizer, build_scheduler, layer_decay_groups
from metrank.training.teacher import build_teacher
from metrank.training.towers import EMA, ImageRows, Rows, TensorRows, Tower, TrainModule

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


def needs_teacher(loss_name: str) -> bool:
    """Whether the loss distils a teacher (takes ``teacher=``: ``cprd``, ``logit_kd``)."""
    return "teacher" in inspect.signature(LOSSES.get(loss_name)).parameters


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]  # test metrics of the selected (best) model; validation metrics live in records
    best: dict[str, Any]  # {"metric", "value", "epoch"} on the validation split
    records: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True  # False when stopped by train.max_steps
    wall_time_s: float = 0.0
    test_final: dict[str, Any] = field(default_factory=dict)  # test metrics of the last model


def init_distributed(device_kind: str) -> None:
    """Join the process group described by torchrun's environment variables (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loss(cfg: TrainConfig, teacher: Any = None) -> tuple:
    """(loss, miner or None). For ``image_text`` a pairwise loss (PML form) is wrapped in ``CrossModalLoss`` (both
    directions); a paired loss is used as is. Distillation losses get ``teacher``."""
    name = cfg.loss.name
    kwargs: dict[str, Any] = dict(cfg.loss.kwargs)
    if needs_teacher(name):
        if cfg.task != "image_text":
            raise ConfigError(f"loss.name={name!r} distils an image-text cross-encoder; it needs task=image_text")
        if teacher is None:
            raise ConfigError(f"loss.name={name!r} needs a teacher (configured in loss.teacher)")
        kwargs["teacher"] = teacher
    loss = create_loss(name, **kwargs)
    if is_paired(name):
        if cfg.task != "image_text":
            raise ConfigError(
                f"loss.name={name!r} takes paired image-text batches; for task=metric use a pairwise loss "
                "(e.g. infonce, triplet, contextual)"
            )
    elif cfg.task == "image_text":
        if name == "xbm":
            raise ConfigError(
                "loss.name=xbm is the class-label memory loss (task=metric); for image_text keep a pairwise loss "
                "and add the memory with loss.memory_size=N (e.g. loss.name=triplet loss.memory_size=1024)"
            )
        loss = CrossModalLoss(loss, combine=cfg.loss.combine, memory_size=cfg.loss.memory_size)
    miner = None
    if cfg.miner.name:
        if cfg.task == "image_text":
            raise ConfigError("miner.name is only used by task=metric; image-text losses mine inside the batch")
        miner = create_miner(cfg.miner.name, **cfg.miner.kwargs)
    return loss, miner


def build_sampler(cfg: TrainConfig, labels: torch.Tensor, embed_train: Any) -> Any:
    """``create_sampler(sampler.name, <labels|ids>=labels, batch_size=..., seed=..., **sampler.kwargs)``.

    The label argument is passed under the name the sampler takes (``labels`` or ``ids``); ``batch_size`` is added
    when the sampler takes one, and a P x K sampler given only ``k`` gets ``p = batch_size // k``; a sampler that
    takes ``embeddings`` (hard batches) gets a callable embedding the training set with the current model.
    """

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
def embed_rows(embed: Any, rows: Rows, device: torch.device, chunk: int) -> torch.Tensor:
    """Embeddings of every row (eval mode is the caller's), in chunks, as float32 on the CPU."""
    out = [
        embed(rows.take(torch.arange(i, min(len(rows), i + chunk)), device)).float().cpu()
        for i in range(0, len(rows), chunk)
    ]
    return torch.cat(out)


@dataclass
class SplitRows:
    """A split as the towers see it: image rows, caption rows (image-text) and the ids/labels."""

    sel: Selection
    image: Rows
    text: Rows | None

    @property
    def caption_image(self) -> torch.Tensor:
        return torch.from_numpy(self.sel.caption_image)

    @property
    def image_ids(self) -> torch.Tensor:
        return torch.from_numpy(self.sel.image_ids)


@torch.no_grad()
def evaluate(module: TrainModule, rows: SplitRows, ks: list[int], device: torch.device, chunk: int = 256) -> dict:
    """Recall@K (and the other metrics ``metrank.metrics`` reports) of the trained towers on one split."""

    was_training = module.training
    module.eval()
    image_emb = embed_rows(module.embed_images, rows.image, device, chunk).numpy()
    if rows.text is not None:
        text_emb = embed_rows(module.embed_texts, rows.text, device, chunk).numpy()
        result = metrics.image_text_metrics(
            image_emb,
            text_emb,
            rows.caption_image,
            ks=tuple(ks),
            image_labels=rows.sel.image_ids,
            progress=False,
        )
    else:
        result = metrics.retrieval_metrics(image_emb, rows.sel.image_ids, ks=tuple(ks), progress=False)
    module.train(was_training)
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


def _tower_lr(cfg: TrainConfig, spec: TowerConfig) -> float:
    if spec.lr is not None:
        return spec.lr
    return cfg.optim.backbone_lr if cfg.optim.backbone_lr is not None else cfg.optim.lr / 10


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) training. See the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        init_distributed(self.device.type)
        self.is_main = distributed.rank() == 0
        self.out_dir = Path(cfg.output.dir)
        seed_everything(cfg.train.seed)
        is_paired(cfg.loss.name)  # fail fast on a bad loss name
        self._check_config()

        self.model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **cfg.model.kwargs)
        self.has_text = cfg.task == "image_text"
        if self.has_text and not self.model.has_text:
            raise InputError(f"task=image_text needs a two-tower model with a text tower; {cfg.model.name!r} has none")
        self.model.to(self.device).eval()
        self.specs = {"image": cfg.model.image, "text": cfg.model.text}
        for tower in self.towers_used():
            if self.specs[tower].mode == "last_n":
                require_split(tower_backbone(self.model, tower), tower).check_blocks(self.specs[tower].blocks)

        train_sel = select_rows(cfg, open_dataset(cfg, cfg.data.train_split, for_training=True), "train")
        self.train_sel, self.val_sel = carve_validation(train_sel, cfg.data.val_fraction, cfg.train.seed)
        if self.val_sel is not None and cfg.data.train_kwargs:  # validate as the test split is read, not as trained
            plain = select_rows(cfg, open_dataset(cfg, cfg.data.train_split), "val")
            self.val_sel = plain.subset("val", np.unique(self.val_sel.image_ids))
        self.probe_sel = self._train_probe(train_sel) if cfg.eval.train_probe and self.val_sel is not None else None
        self.test_sel = select_rows(cfg, open_dataset(cfg, cfg.data.eval_split), "test")
        self.mirror = bool(self.train_sel.dataset.mirror_invariant)
        self.train_rows = self._rows(self.train_sel, train=True)
        self.val_rows = self._rows(self.val_sel, train=False) if self.val_sel is not None else None
        self.test_rows = self._rows(self.test_sel, train=False)
        self.probe_rows = self._rows(self.probe_sel, train=False) if self.probe_sel is not None else None

        teacher = self._teacher() if needs_teacher(cfg.loss.name) else None
        self.loss, self.miner = build_loss(cfg, teacher)
        self._apply_lora()
        if cfg.train.threads is not None:  # for the training loop; feature extraction used the default
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # same RNG state at step 1 whether the features were cached or computed
        towers = {
            tower: Tower(
                self.model,
                tower,
                self.specs[tower].mode,
                self.specs[tower].blocks,
                cached_prefix=self._prefix_cached(tower),
                feature_dropout=cfg.train.feature_dropout,
                checkpointing=cfg.train.checkpointing,
            )
            for tower in self.towers_used()
        }
        trainable = [
            name
            for tower in self.towers_used()
            for name in trainable_parameter_names(self.model, tower, self.specs[tower].mode, self.specs[tower].blocks)
        ]
        self.module = TrainModule(
            self.model, towers["image"], towers.get("text"), self.loss, cfg.task, self.miner, trainable
        )
        self.module.to(self.device)
        self.wrapped: torch.nn.Module = self.module
        if distributed.is_distributed() and cfg.train.grad_cache is None:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

        self.slots = self._caption_slots()
        if self.slots is not None:  # the sampler draws caption slots (identity of the slot's image)
            labels = torch.from_numpy(self.train_sel.image_ids[self.slots.slot_image])
        else:
            labels = torch.from_numpy(self.train_sel.caption_ids if self.has_text else self.train_sel.image_ids)
        self.sampler = build_sampler(
            cfg,
            labels,
            lambda: embed_rows(self.module.embed_images, self.train_rows.image, self.device, 256),
        )
        self._set_epoch(1)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the sampler yields no batch from {len(labels)} training items; lower "
                "train.batch_size (or sampler p/k) or use more data"
            )
        acc = cfg.train.accumulate
        self.total_steps = -(-self.steps_per_epoch // acc) * cfg.train.epochs
        groups = self.module.model_parameters()
        backbone_groups = [
            g for tower in self.towers_used() if groups[tower] for g in self._backbone_groups(tower, groups)
        ]
        heads = [p for _, p in groups["heads"]]
        self.optimizer = build_optimizer(cfg.optim, heads, self.module.loss_parameters(), backbone_groups)
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps)
        amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if cfg.train.amp else nullcontext
        self.scaler = (
            torch.amp.GradScaler("cuda")
            if (cfg.train.amp and amp_dtype == torch.float16 and self.device.type == "cuda")
            else None
        )
        self.ema = EMA(self.module, cfg.train.ema) if cfg.train.ema is not None else None
        self.select = cfg.eval.select or ("rsum" if cfg.task == "image_text" else "R@1")

    # ---------------------------------------------------------------------------------------------- building
    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.train.grad_cache is not None and all(getattr(cfg.model, t).mode == "heads" for t in ("image", "text")):
            raise ConfigError(
                "train.grad_cache chunks encoder forwards, but both towers train heads only on cached features "
                "(nothing to chunk: such batches fit in memory); drop train.grad_cache or set model.<tower>.mode"
            )
        frozen = sorted(k for k in cfg.model.kwargs if k.startswith(("freeze_", "unfreeze_")))
        if frozen:
            raise ConfigError(
                f"model.kwargs {frozen} do not choose what trains here; set model.image.mode / model.text.mode "
                "(heads, last_n with blocks, lora, full) instead"
            )
        if cfg.data.augment and cfg.model.image.mode == "heads":
            raise ConfigError(
                "data.augment has no effect when the image tower trains heads only (they train on cached features "
                "of the eval transform); set model.image.mode to last_n, lora or full, or data.augment=false"
            )
        acc = cfg.train.accumulate
        for key, value in (
            ("train.max_steps", cfg.train.max_steps),
            ("train.checkpoint_every", cfg.train.checkpoint_every),
        ):
            if value is not None and value % acc:
                raise ConfigError(
                    f"{key}={value} must be a multiple of train.accumulate={acc} (states are saved between optimizer steps)"
                )

    def _train_probe(self, train_sel: Selection) -> Selection:
        """A fixed subset of the training identities, as many as the validation split (seeded by ``train.seed``),
        read as the validation split is (plain captions when ``data.train_kwargs`` change the training rows)."""
        assert self.val_sel is not None
        n = len(np.unique(self.val_sel.image_ids))
        ids = np.random.default_rng([self.cfg.train.seed, 1]).permutation(np.unique(self.train_sel.image_ids))[:n]
        source = train_sel
        if self.cfg.data.train_kwargs:
            source = select_rows(self.cfg, open_dataset(self.cfg, self.cfg.data.train_split), "train")
        return source.subset("trainprobe", ids)

    def _caption_slots(self) -> CaptionSlots | None:
        """``data.captions_per_image`` captions of each training image per epoch (:mod:`.caption_sampling`)."""
        sel, per_image = self.train_sel, self.cfg.data.captions_per_image
        if sel.caption_image is None or per_image is None:
            return None
        return CaptionSlots(sel.caption_image, len(sel.image_index), per_image, self.cfg.train.seed)

    def _backbone_groups(self, tower: str, groups: dict[str, list]) -> list[tuple[list[torch.nn.Parameter], float]]:
        """The optimizer groups of a tower's trained backbone part: one at the tower's learning rate, or one per
        layer with ``optim.layer_decay`` (:func:`metrank.training.optim.layer_decay_groups`)."""
        lr, decay = _tower_lr(self.cfg, self.specs[tower]), self.cfg.optim.layer_decay
        if decay is None:
            return [([p for _, p in groups[tower]], lr)]
        split = block_split(tower_backbone(self.model, tower))
        if split is None:
            raise ConfigError(
                f"optim.layer_decay needs the blocks of the {tower} backbone, but "
                f"{type(tower_backbone(self.model, tower)).__name__} has no block split here; set optim.layer_decay=null"
            )
        return layer_decay_groups(groups[tower], split.layer_of, split.n_blocks, lr, decay)

    def towers_used(self) -> list[str]:
        return ["image", "text"] if self.has_text else ["image"]

    def _prefix_cached(self, tower: str) -> bool:
        return self.specs[tower].mode == "last_n" and (tower == "text" or not self.cfg.data.augment)

    def _image_transform(self, train: bool) -> Any:
        from torchvision import transforms as T

        if not (train and self.cfg.data.augment):
            return self.model.image_transform
        if self.mirror:
            return T.Compose([T.RandomHorizontalFlip(), self.model.train_image_transform])
        return self.model.train_image_transform

    def _rows(self, sel: Selection, train: bool) -> SplitRows:
        image = self._tower_rows("image", sel, train)
        text = self._tower_rows("text", sel, train) if self.has_text else None
        return SplitRows(sel, image, text)

    def _tower_rows(self, tower: str, sel: Selection, train: bool) -> Rows:
        cfg, spec = self.cfg, self.specs[tower]
        if spec.mode == "heads":
            if tower == "image":
                return TensorRows(cached_image_features(self.model, sel, cfg, self.device))
            return TensorRows(cached_text_features(self.model, sel, cfg, self.device))
        if self._prefix_cached(tower):
            return TensorRows(*self._cached_prefix(tower, sel))
        if tower == "image":
            return ImageRows(sel.load_image, len(sel.image_index), self._image_transform(train))
        return TensorRows(self._tokens(sel.captions or []))

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return torch.cat([self.model.tokenize(captions[i : i + 1024]) for i in range(0, len(captions), 1024)])

    def _cached_prefix(self, tower: str, sel: Selection) -> tuple[torch.Tensor, ...]:
        """The frozen prefix's activations of every row (``model.<tower>.blocks`` trained blocks), cached on disk."""
        cfg, k = self.cfg, self.specs[tower].blocks
        split = require_split(tower_backbone(self.model, tower), tower)
        chunk = cfg.train.feature_batch_size
        if tower == "image":
            fingerprint, n = image_fingerprint(self.model), len(sel.image_index)
            keys: list[Any] = sel.image_keys()

            def batch(i: int) -> torch.Tensor:
                rows = range(i, min(n, i + chunk))
                return torch.stack([self.model.image_transform(sel.load_image(r)) for r in rows])
        else:
            fingerprint, keys = text_fingerprint(self.model), list(sel.captions or [])
            n = len(keys)

            def batch(i: int) -> torch.Tensor:
                return self.model.tokenize(keys[i : i + chunk])

        key = feature_cache_key(
            fingerprint, {"prefix_blocks": k, "dataset": cfg.data.dataset, "kwargs": cfg.data.kwargs, "rows": keys}
        )

        @torch.no_grad()
        def compute() -> dict[str, torch.Tensor]:
            parts = [
                split.prefix(batch(i).to(self.device), k)
                for i in tqdm(range(0, n, chunk), desc=f"{sel.name} {tower} prefix", disable=not self.is_main)
            ]
            return {str(j): torch.cat([p[j].cpu() for p in parts]) for j in range(len(parts[0]))}

        state = cached(cfg.output.cache_dir, f"{cfg.data.dataset}-{sel.name}-{tower}-prefix{k}", key, compute)
        return tuple(state[str(j)] for j in range(len(state)))

    def _teacher(self) -> Any:
        """The distillation teacher, on the frozen pooled features of the training pairs (:mod:`.teacher`)."""
        cfg, sel = self.cfg, self.train_sel
        image = cached_image_features(self.model, sel, cfg, self.device)
        text = cached_text_features(self.model, sel, cfg, self.device)
        self.teacher_image, self.teacher_text = image, text
        caption_image = torch.from_numpy(sel.caption_image)
        source = {
            "image_dim": int(image.shape[1]),
            "text_dim": int(text.shape[1]),
            "image_backbone": image_fingerprint(self.model),
            "text_backbone": text_fingerprint(self.model),
        }
        ids = torch.from_numpy(sel.caption_ids)
        return build_teacher(
            cfg.loss.teacher, image[caption_image], text, ids, source, self.out_dir, cfg.train.seed, self.device
        )

    def _apply_lora(self) -> None:
        tuning = {
            tower: {"lora": lora_settings(self.specs[tower], tower_backbone(self.model, tower))}
            for tower in self.towers_used()
            if self.specs[tower].mode == "lora"
        }
        if tuning:
            apply_tuning(self.model, tuning)
            self.model.to(self.device)

    # ------------------------------------------------------------------ state
    def _save_state(
        self, epoch: int, step_in_epoch: int, global_step: int, best: dict[str, Any], loss_sum: float, loss_count: int
    ) -> None:
        if self.is_main:
            save_training_state(
                self.out_dir / "checkpoints" / "last.pt",
                trainable=self.module.trainable_state(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                epoch=epoch,
                step_in_epoch=step_in_epoch,
                global_step=global_step,
                best={**best, "loss_sum": loss_sum, "loss_count": loss_count},
                config=self.cfg.to_dict(),
                ema=self.ema.shadow if self.ema is not None else None,
            )

    def _export(self, name: str, state: dict[str, torch.Tensor] | None, **extra: Any) -> Path:
        """Write the whole model (frozen parts + trained ``state``) with ``metrank.encoders.save_checkpoint``."""

        with self._weights(state):
            path = self.out_dir / name
            save_checkpoint(path, self.model, **extra)
        return path

    @contextmanager
    def _weights(self, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """The module temporarily holds ``state`` (None = the current weights)."""
        current = self.module.trainable_state()
        if state is not None:
            self.module.load_trainable_state(state)
        try:
            yield
        finally:
            self.module.load_trainable_state(current)

    def _eval_state(self) -> dict[str, torch.Tensor]:
        """The weights that are evaluated and exported: the EMA average when enabled, else the current ones."""
        return self.ema.state() if self.ema is not None else self.module.trainable_state()

    # ------------------------------------------------------------------ loop
    def _set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        if self.slots is not None:
            self.slots.set_epoch(epoch)

    def _batch(self, indices: list[int]) -> tuple[Any, Any, torch.Tensor | None, dict[str, Any]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows, extra = self.train_rows, {}
        if self.has_text:
            assert rows.text is not None
            if self.slots is not None:  # caption slots -> this epoch's captions
                idx = torch.from_numpy(self.slots.captions(np.asarray(indices)))
            images = rows.caption_image[idx]
            if needs_teacher(self.cfg.loss.name):
                extra = {
                    "images": self.teacher_image[images].to(self.device),
                    "texts": self.teacher_text[idx].to(self.device),
                }
            return (
                rows.image.take(images, self.device),
                rows.text.take(idx, self.device),
                rows.image_ids[images].to(self.device),
                extra,
            )
        return rows.image.take(idx, self.device), rows.image_ids[idx].to(self.device), None, extra

    def _backward(self, indices: list[int]) -> float:
        """Forward + backward of one batch (``1 / train.accumulate`` of the loss); returns the loss."""
        image_rows, other, ids, extra = self._batch(indices)
        scale = 1.0 / self.cfg.train.accumulate
        if self.cfg.train.grad_cache is not None:
            with self.autocast():
                loss = grad_cache_backward(
                    self.module.embed_images,
                    self.module.embed_texts if self.has_text else None,
                    self.module.loss_of,
                    image_rows,
                    other,
                    ids,
                    self.cfg.train.grad_cache,
                    self.device,
                    scale=scale * (self.scaler.get_scale() if self.scaler is not None else 1.0),
                    **extra,
                )
            if distributed.is_distributed():
                for p in self.module.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= distributed.world_size()
            self._check_finite(loss)
            return float(loss)
        with self.autocast():
            loss = self.wrapped(image_rows, other, ids, **extra)
        self._check_finite(loss)
        if self.scaler is not None:
            self.scaler.scale(loss * scale).backward()
        else:
            (loss * scale).backward()
        return float(loss.detach())

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise InputError(f"the loss became {loss.item()} (not finite); lower optim.lr or enable train.grad_clip")

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if hasattr(self.loss, "step"):  # loss schedules, e.g. the hard-negative warm-up
            self.loss.step()
        if self.ema is not None:
            self.ema.update()

    def _evaluate(self, rows: SplitRows) -> dict[str, float]:
        """Metrics of the evaluated weights on ``rows`` (the validation split), plus ``train_<metric>`` on the
        training probe (recalls and rsum) when ``eval.train_probe``."""
        with self._weights(self._eval_state() if self.ema is not None else None):
            result = evaluate(self.module, rows, list(self.cfg.eval.ks), self.device, self.cfg.train.feature_batch_size)
            if self.probe_rows is not None:
                probe = evaluate(
                    self.module, self.probe_rows, list(self.cfg.eval.ks), self.device, self.cfg.train.feature_batch_size
                )
                result.update({f"train_{k}": v for k, v in probe.items() if "R@" in k or k in ("rsum", "MAP@R")})
            return result

    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        epoch, skip, global_step = 1, 0, 0
        best: dict[str, Any] = {"metric": self.select, "value": None, "epoch": None, "state": None}
        loss_sum, loss_count = 0.0, 0
        if resume:
            state = load_training_state(state_path(cfg, resume))
            check_resume_config(state["config"], cfg.to_dict())
            self.module.load_trainable_state(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.shadow = {k: v.clone() for k, v in state["ema"].items()}
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
        select_rows_ = self.val_rows
        if not resume and cfg.eval.at_start and select_rows_ is not None:
            self._log(
                log,
                {
                    "epoch": 0,
                    "step": 0,
                    "loss": None,
                    "lr": self.scheduler.get_last_lr()[0],
                    "time_s": 0.0,
                    **self._evaluate(select_rows_),
                },
            )
        completed = True
        acc = cfg.train.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        while epoch <= cfg.train.epochs:
            self._set_epoch(epoch)
            self.module.train()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=skip,
                desc=f"epoch {epoch}/{cfg.train.epochs}",
                disable=not self.is_main,
                leave=False,
                file=sys.stderr,
            )
            epoch_start = time.perf_counter()
            for step_in_epoch, indices in enumerate(self.sampler):
                if step_in_epoch < skip:
                    continue
                loss = self._backward(indices)
                if (step_in_epoch + 1) % acc == 0 or step_in_epoch + 1 == self.steps_per_epoch:
                    self._optimizer_step()
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
                "epoch_s": round(time.perf_counter() - epoch_start, 3),
            }
            if select_rows_ is not None and (epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs):
                metrics_now = self._evaluate(select_rows_)
                record.update(metrics_now)
                value = metrics_now.get(self.select)
                if value is None:
                    raise InputError(
                        f"eval.select={self.select!r} is not a reported metric; valid: {', '.join(metrics_now)}"
                    )
                if best["value"] is None or value > best["value"]:
                    best = {"metric": self.select, "value": value, "epoch": epoch, "state": self._eval_state()}
            self._log(log, record)
            epoch, skip, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            self._save_state(epoch, 0, global_step, best, loss_sum, loss_count)
        test_best: dict[str, float] = {}
        test_final: dict[str, float] = {}
        if completed:
            final_state = self._eval_state()
            if best["state"] is None:  # no validation split: the last model is the selected one
                best = {"metric": self.select, "value": None, "epoch": cfg.train.epochs, "state": final_state}
            with self._weights(final_state):
                test_final = evaluate(
                    self.module, self.test_rows, list(cfg.eval.ks), self.device, cfg.train.feature_batch_size
                )
            with self._weights(best["state"]):
                test_best = evaluate(
                    self.module, self.test_rows, list(cfg.eval.ks), self.device, cfg.train.feature_batch_size
                )
            if self.is_main:
                summary = {k: v for k, v in best.items() if k != "state"}
                config = cfg.to_dict()
                self._export("model_final.pt", final_state, test_metrics=test_final, train_config=config)
                self._export(
                    "model_best.pt", best["state"], test_metrics=test_best, train_best=summary, train_config=config
                )
        if log is not None:
            log.close()
        records = log.records if log is not None else []
        return TrainResult(
            self.out_dir,
            test_best,
            {k: v for k, v in best.items() if k != "state"},
            records,
            completed,
            time.perf_counter() - start,
            test_final,
        )

    def _mean_loss(self, loss_sum: float, loss_count: int) -> float:
        totals = torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64)
        if distributed.is_distributed():
            dist.all_reduce(totals)
        return float(totals[0]) / max(float(totals[1]), 1.0)

    def _log(self, log: MetricsLog | None, record: dict[str, Any]) -> None:
        if log is not None:
            log.log(record)


def state_path(cfg: TrainConfig, resume: bool | str | Path) -> Path:
    """The training state ``resume`` refers to: True = ``<output.dir>/checkpoints/last.pt``, else the path given."""
    return Path(cfg.output.dir) / "checkpoints" / "last.pt" if resume is True else Path(str(resume))


def train(cfg: TrainConfig, resume: bool | str | Path = False) -> TrainResult:
    """Build a :class:`Trainer` from ``cfg`` and run it (``resume``: True = ``<output.dir>/checkpoints/last.pt``).

    A resume checks the state and the config first, before any model or feature is built."""
    if resume:
        check_resume_config(load_training_state(state_path(cfg, resume))["config"], cfg.to_dict())
    return Trainer(cfg).fit(resume)
