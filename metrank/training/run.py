"""Command-line entry shared by ``metrank train`` and the ``train/*.py`` scripts: config + overrides -> training."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from metrank import distributed
from metrank.training.config import load_config
from metrank.training.trainer import TrainResult, train

SUMMARY_KEYS = {
    "image_text": ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"),
    "metric": ("R@1", "R@2", "R@4", "R@8", "MAP@R", "R-precision"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see train/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.epochs=5 optim.lr=3e-4 loss.name=triplet")
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from <output.dir>/checkpoints/last.pt")
    parser.add_argument("--resume-from", metavar="STATE", help="continue exactly from this training state file")


def resume_arg(args: argparse.Namespace):
    """``--resume`` -> True, ``--resume-from PATH`` -> PATH, neither -> False."""
    return args.resume_from or args.resume


def summary(result: TrainResult, task: str) -> str:
    """Final held-out metrics, best epoch and where the model was written."""
    from metrank.metrics import format_table

    keys = [k for k in SUMMARY_KEYS[task] if k in result.metrics] or list(result.metrics)
    lines = [f"held-out metrics after the last epoch ({'percent' if task == 'image_text' else 'fraction'}):",
             format_table({k: result.metrics[k] for k in keys}),
             f"best {result.best['metric']} = {result.best['value']} at epoch {result.best['epoch']}",
             f"wall time {result.wall_time_s:.1f} s; outputs in {result.out_dir}/ "
             "(model_best.pt, model_final.pt, metrics.jsonl/csv, curves.png, checkpoints/last.pt)"]
    return "\n".join(lines)


def run(config: str, overrides: Sequence[str] = (), resume=False, expected_task: Optional[str] = None) -> int:
    cfg = load_config(config, overrides)
    if expected_task is not None and cfg.task != expected_task:
        raise ValueError(f"{config} is a task={cfg.task!r} config but this script trains task={expected_task!r}; "
                         "use `metrank train` (dispatches on the task) or the matching script")
    result = train(cfg, resume=resume)
    if distributed.rank() == 0:
        if result.completed:
            print(summary(result, cfg.task))
        else:
            print(f"stopped after train.max_steps={cfg.train.max_steps} steps; training state saved in "
                  f"{result.out_dir}/checkpoints/last.pt (continue with --resume)")
    return 0


def main(argv: Optional[Sequence[str]] = None, expected_task: Optional[str] = None,
         description: str = "Train retrieval heads from a YAML config.") -> int:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args.config, args.overrides, resume_arg(args), expected_task)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
