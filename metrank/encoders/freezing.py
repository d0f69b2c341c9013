"""Freezing image and text towers for feature caching and partial fine-tuning.

A timm trunk is split into its coarse layer groups (``group_matcher(coarse=True)``: the stem, each stage, the final
conv/norm). ``freeze_timm_trunk(trunk, unfreeze_last=N)`` stops gradients for all but the last ``N`` groups and, with
``freeze_bn=True``, turns their BatchNorm layers into ``FrozenBatchNorm2d`` (running statistics fixed, so small or
single-class batches cannot corrupt them). ``unfreeze_last=0`` freezes the whole trunk, including its pooling.
"""

from __future__ import annotations

from typing import Any

from metrank.errors import InputError


def freeze_timm_trunk(trunk: Any, unfreeze_last: int = 0, freeze_bn: bool = True) -> None:
    """Freeze a timm model in place except its last ``unfreeze_last`` coarse layer groups."""
    from timm.models import group_modules
    from timm.utils import freeze

    if unfreeze_last < 0:
        raise InputError(f"unfreeze_last must be >= 0, got {unfreeze_last}")
    if unfreeze_last == 0:
        freeze(trunk, include_bn_running_stats=freeze_bn)
        return
    groups = group_modules(trunk, trunk.group_matcher(coarse=True))
    if unfreeze_last >= len(groups):
        raise InputError(
            f"unfreeze_last={unfreeze_last} but {type(trunk).__name__} has only {len(groups)} layer "
            "groups; use freeze=False to train the whole tower"
        )
    frozen_ids = sorted(groups)[: len(groups) - unfreeze_last]
    frozen = [name for group_id in frozen_ids for name in groups[group_id]]
    freeze(trunk, submodules=frozen, include_bn_running_stats=freeze_bn)
