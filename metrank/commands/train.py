"""``metrank train CONFIG [key.sub=value ...] [--resume]``: train from a YAML config (task image_text or metric).

The ``train/*.py`` scripts are this command with ``--task`` fixed; ``torchrun`` launches either form.
"""

from __future__ import annotations

import argparse

from metrank import distributed
from metrank.errors import ConfigError
from metrank.metrics import format_table
from metrank.scale.train import train as ray_train
from metrank.training.config import load_config
from metrank.training.trainer import TrainResult, train

SUMMARY_KEYS = {
    "image_text": ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"),
    "metric": ("R@1", "R@2", "R@4", "R@8", "MAP@R", "R-precision"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a retrieval model from a YAML config",
        description="Train a retrieval model from a YAML config (train/configs/*.yaml); dispatches on the "
        "config's task.",
    )
    parser.add_argument("config", help="YAML training config (see train/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides such as train.epochs=5 optim.lr=3e-4 loss.name=triplet",
    )
    parser.add_argument("--resume", action="store_true", help="continue exactly from <output.dir>/checkpoints/last.pt")
    parser.add_argument("--resume-from", metavar="STATE", help="continue exactly from this training state file")
    parser.add_argument("--task", choices=sorted(SUMMARY_KEYS), help="refuse a config of another task")
    parser.add_argument(
        "--ray", type=int, metavar="N", help="train on N Ray Train workers (metrank.scale.train; RAY_ADDRESS: cluster)"
    )
    parser.add_argument("--gpus", action="store_true", help="with --ray: one GPU per worker (NCCL)")
    parser.set_defaults(func=_run)


def summary(result: TrainResult, task: str) -> str:
    """Test metrics of the selected model, the validation choice and where the model was written."""
    keys = [k for k in SUMMARY_KEYS[task] if k in result.metrics] or list(result.metrics)
    lines = [
        f"test metrics of model_best.pt ({'percent' if task == 'image_text' else 'fraction'}):",
        format_table({k: result.metrics[k] for k in keys}),
        f"selected on the validation split: {result.best['metric']} = {result.best['value']} at epoch "
        f"{result.best['epoch']}",
        f"wall time {result.wall_time_s:.1f} s; outputs in {result.out_dir}/ "
        "(model_best.pt, model_final.pt, metrics.jsonl/csv, curves.png, checkpoints/last.pt)",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.task is not None and cfg.task != args.task:
        raise ConfigError(
            f"{args.config} is a task={cfg.task!r} config but this script trains task={args.task!r}; "
            "use `metrank train` (dispatches on the task) or the matching script"
        )
    if args.ray:
        out = ray_train(
            args.config, args.overrides, args.ray, use_gpu=args.gpus, resume=args.resume_from or args.resume
        )
        print(f"trained on {args.ray} Ray workers; outputs in {out}/ (model_best.pt, model_final.pt, metrics.jsonl)")
        return 0
    result = train(cfg, resume=args.resume_from or args.resume)
    if distributed.rank() == 0:
        if result.completed:
            print(summary(result, cfg.task))
        else:
            print(
                f"stopped after train.max_steps={cfg.train.max_steps} steps; training state saved in "
                f"{result.out_dir}/checkpoints/last.pt (continue with --resume)"
            )
    return 0
