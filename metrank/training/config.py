"""Training configuration: a dataclass schema filled from a YAML file plus ``key.sub=value`` overrides.

Every key is checked against the schema, so a typo is an error naming the nearest valid key, and every value is
checked against the field's type (values given on the command line are parsed as YAML, so ``train.lr=3e-4`` is a
float and ``data.kwargs={vendors: [google]}`` a dict). Free-form ``kwargs`` dicts are passed on to the factories
(``create_model``, ``create_dataset``, ``create_loss``, ``create_miner``, ``create_sampler``), whose registries
reject unknown names with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from metrank.atomic import atomic_write_bytes
from metrank.errors import ConfigError, MissingFileError

TASKS = ("image_text", "metric")
MODES = ("heads", "last_n", "lora", "full")


@dataclass
class TowerConfig:
    """How one tower trains (see metrank.encoders.tuning): ``heads`` = projection head only on cached backbone
    features; ``last_n`` = the last ``blocks`` blocks + head (the frozen prefix's activations cached when the
    transform is deterministic); ``lora`` = PEFT LoRA adapters on the backbone's ``lora_targets`` + head; ``full``."""

    mode: str = "heads"
    blocks: int = 0  # last_n: number of trailing backbone blocks that train
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # module-name suffixes; null = the tower's attention/MLP or conv layers
    lr: float | None = None  # backbone learning rate of this tower; null = optim.backbone_lr


@dataclass
class ModelConfig:
    name: str = "lite0-minilm"  # any metrank.encoders.create_model name
    pretrained: bool | str | None = True
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {embed_dim: 256}
    image: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=TowerConfig)


@dataclass
class DataConfig:
    dataset: str = "emoji"  # any metrank.data.create_dataset name
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"  # touched only for the final numbers (of the best and the last model)
    # fraction of the training identities held out as the validation split that picks model_best.pt
    # (class-disjoint, seeded by train.seed); 0 = no validation split, select on the last epoch
    val_fraction: float = 0.1
    augment: bool = False  # train transform: random resized crop + colour jitter (+ flip if the dataset allows)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_dataset for both splits
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # and these for the training split only
    # image_text training: each epoch, each image pairs with this many of its captions, drawn afresh per epoch
    # (seeded; metrank.training.caption_sampling); null = every caption every epoch
    captions_per_image: int | None = None
    fetch: bool = True  # fetch the dataset through metrank.data when it is missing
    max_classes: int | None = None  # keep only the first N classes / identities of each split (small runs)
    max_per_class: int | None = None  # and only the first N items (images) of each class
    # image_text: what makes two images "the same" (positives of each other, never negatives; a caption hits on
    # any of them): "labels" = the dataset's image_labels (emoji: the identity drawn by several vendors),
    # "image" = each image is its own identity (Tux Paint, COCO: the caption describes that one picture)
    pair_ids: str = "labels"


@dataclass
class LossConfig:
    name: str = "infonce"  # any metrank.losses.create_loss name
    # e.g. {margin: 0.2, warmup_steps: 200} for hard_negative: losses with a ``step()`` method (warm-up schedules)
    # are stepped once per optimizer step
    kwargs: dict[str, Any] = field(default_factory=dict)
    # image_text with a pairwise loss: CrossModalLoss(loss, combine, memory_size) makes it symmetric; memory_size > 0
    # adds a cross-batch memory (XBM) of that many earlier pairs as extra references
    combine: str = "mean"
    memory_size: int = 0
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig())


@dataclass
class TeacherConfig:
    """The cross-encoder teacher of ``cprd`` / ``logit_kd`` (metrank.losses.teachers.CrossAttentionTeacher on the
    frozen pooled features of the two towers): loaded from ``checkpoint``, or trained first on the training split
    with the image-text matching loss for ``epochs`` (and written to ``<output.dir>/teacher.pt``)."""

    checkpoint: str | None = None
    epochs: int = 5
    lr: float = 1e-3
    width: int = 256
    depth: int = 2
    batch_size: int = 64


@dataclass
class MinerConfig:
    name: str | None = None  # any metrank.miners.create_miner name; null = no miner (all pairs)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    name: str = "unique_id"  # any metrank.samplers.create_sampler name
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {p: 32, k: 4}; batch_size is added when absent


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    loss_lr: float | None = None  # learning rate of loss parameters (e.g. InfoNCE logit scale); null = lr
    loss_weight_decay: float = 0.0
    backbone_lr: float | None = None  # learning rate of trained backbone weights (last_n/lora/full); null = lr / 10
    backbone_weight_decay: float | None = None  # null = weight_decay
    # layer-wise learning-rate decay of trained backbones (BEiT / ELECTRA): block i of n (0-based) gets
    # backbone_lr * layer_decay ** (n - i), the stem layer_decay ** (n + 1), the tail after the last block 1; null = off
    layer_decay: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine (with linear warm-up) | constant (with linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak learning rate


@dataclass
class TrainLoopConfig:
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    # dropout on the cached backbone features before the heads (training only; regularises small data sets)
    feature_dropout: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; null = no clipping
    amp: bool = False  # autocast (bf16 on CPU, fp16/bf16 on CUDA)
    amp_dtype: str = "bfloat16"  # bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    # torch.set_num_threads for the head-training loop (after feature extraction): its small matmuls often run
    # faster on 1 thread, especially when other processes share the cores
    threads: int | None = None
    feature_batch_size: int = 64
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans all epochs)
    checkpoint_every: int | None = None  # also write the training state every N steps (mid-epoch resume)
    # GradCache (Gao et al. 2021): embed the batch in chunks of this many rows without a graph, compute the loss on
    # the whole batch, back-propagate chunk by chunk; the same gradient as the full batch in the memory of a chunk
    grad_cache: int | None = None
    accumulate: int = 1  # gradient accumulation: optimizer step every N batches (the loss of each batch / N)
    checkpointing: bool = False  # activation (gradient) checkpointing in the trained backbones
    ema: float | None = None  # exponential moving average of the trained weights (decay, e.g. 0.999); evaluated


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (and always after the last)
    at_start: bool = True  # evaluate the untrained heads as epoch 0
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    select: str | None = None  # metric that picks the best model; null = rsum (image_text) / R@1 (metric)
    # also evaluate a fixed, seeded subset of the *training* identities (as many as the validation split, embedded
    # the same way: eval transform, plain captions) every epoch, logged as train_<metric>: train vs held-out curves
    train_probe: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    cache_dir: str | None = None  # feature cache; null = $METRANK_DATA/features (default ~/.cache/metrank/features)
    tensorboard: bool = True  # write TensorBoard scalars when tensorboard is installed
    plot: bool = True


@dataclass
class TrainConfig:
    task: str = "image_text"  # image_text | metric
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _nearest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f"did you mean {close[0]!r}? " if close else ""


def _yaml_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _fill(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from ``values``, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in fields:
            valid = [prefix + k for k in fields]
            raise ConfigError(
                f"unknown config key {prefix + key!r}; {_nearest(prefix + key, valid)}"
                f"valid keys here: {', '.join(valid)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, prefix + key + ".")
            continue
        if isinstance(value, str) and _type_ok(1.0, hints[key]) and not _type_ok(value, hints[key]):
            value = _yaml_float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key {prefix + key!r} must be {_type_name(hints[key])}, got {value!r}")
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        setattr(obj, key, value)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):  # an override below a scalar: let the schema check report it
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "loss.kwargs.margin=0.2"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_path(tree, key, _read_yaml(raw, f"override {item!r}") if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):  # kwargs: merge keys too
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a (nested) dict."""
    cfg = TrainConfig()
    _fill(cfg, values or {}, "")
    if cfg.task not in TASKS:
        raise ConfigError(f"config key 'task' must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.data.pair_ids not in ("labels", "image"):
        raise ConfigError(f"data.pair_ids must be 'labels' or 'image', got {cfg.data.pair_ids!r}")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise ConfigError(f"unknown optimizer {cfg.optim.name!r}; valid names: adamw, sgd")
    if cfg.schedule.name not in ("cosine", "constant"):
        raise ConfigError(f"unknown schedule {cfg.schedule.name!r}; valid names: constant, cosine")
    for tower in ("image", "text"):
        spec = getattr(cfg.model, tower)
        if spec.mode not in MODES:
            raise ConfigError(f"model.{tower}.mode must be one of {', '.join(MODES)}, got {spec.mode!r}")
        if spec.mode == "last_n" and spec.blocks < 1:
            raise ConfigError(f"model.{tower}.mode=last_n needs model.{tower}.blocks >= 1, got {spec.blocks}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.optim.layer_decay is not None and not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1] or null, got {cfg.optim.layer_decay}")
    if cfg.data.captions_per_image is not None:
        if cfg.data.captions_per_image < 1:
            raise ConfigError(f"data.captions_per_image must be >= 1 or null, got {cfg.data.captions_per_image}")
        if cfg.task != "image_text":
            raise ConfigError("data.captions_per_image samples captions: it needs task=image_text")
    if cfg.train.grad_cache is not None and cfg.train.grad_cache < 1:
        raise ConfigError(f"train.grad_cache must be >= 1 rows per chunk or null, got {cfg.train.grad_cache}")
    if cfg.train.accumulate < 1:
        raise ConfigError(f"train.accumulate must be >= 1, got {cfg.train.accumulate}")
    if cfg.train.ema is not None and not 0.0 < cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema must be in (0, 1) or null, got {cfg.train.ema}")
    if cfg.train.amp_dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"train.amp_dtype must be bfloat16 or float16, got {cfg.train.amp_dtype!r}")
    for key, value in (
        ("train.epochs", cfg.train.epochs),
        ("train.batch_size", cfg.train.batch_size),
        ("eval.every", cfg.eval.every),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0.0 <= cfg.train.feature_dropout < 1.0:
        raise ConfigError(f"train.feature_dropout must be in [0, 1), got {cfg.train.feature_dropout}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {cfg.train.max_steps}")
    return cfg


def _read_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` (plain data only: tags such as ``!!python/object`` are refused, never run); a syntax
    or constructor error is a ``ConfigError`` naming ``what`` and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML{at}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {str(path)!r} not found")
        values = _read_yaml(path.read_text(), f"config file {str(path)!r}") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a YAML mapping at the top level")
    return config_from_dict(_merge(values, parse_overrides(overrides)))


def save_config(cfg: TrainConfig, path: str | Path) -> None:

    atomic_write_bytes(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
