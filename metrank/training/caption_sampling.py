"""Caption variety per epoch: each image contributes a few of its captions, drawn afresh every epoch.

A dataset with several captions per image (emoji with ``caption_mode: phrases``: the name and each short name;
COCO: five captions) can train on all of them every epoch (the default), which weights images by their caption count
and repeats the same pairs, or on ``data.captions_per_image`` = m of them per epoch: image ``i`` with ``c_i``
captions fills ``min(m, c_i)`` *slots*, and epoch ``e`` assigns the slots a seeded draw without replacement from the
image's captions (``rng([seed, e])``). Every epoch has the same length and the same images; which captions pair with
them changes, deterministically (a resume at epoch ``e`` draws the same captions).
"""

from __future__ import annotations

import numpy as np


class CaptionSlots:
    """Slots (``min(per_image, c_i)`` per image) and, after ``set_epoch(e)``, the caption each slot holds."""

    def __init__(self, caption_image: np.ndarray, n_images: int, per_image: int, seed: int) -> None:
        caption_image = np.asarray(caption_image, dtype=np.int64)
        counts = np.bincount(caption_image, minlength=n_images)
        order = np.argsort(caption_image, kind="stable")
        self.groups = np.split(order, np.cumsum(counts)[:-1])  # caption indices of each image
        self.per_image, self.seed = int(per_image), int(seed)
        taken = np.minimum(counts, self.per_image)
        self.slot_image = np.repeat(np.arange(n_images), taken)
        self.slot_caption = np.empty(len(self.slot_image), dtype=np.int64)
        self.set_epoch(1)

    def __len__(self) -> int:
        return len(self.slot_image)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, int(epoch)])
        drawn = [rng.permutation(group)[: self.per_image] for group in self.groups if len(group)]
        self.slot_caption = np.concatenate(drawn) if drawn else self.slot_caption

    def captions(self, slots: np.ndarray) -> np.ndarray:
        """The caption index (into the split's captions) of each slot in this epoch."""
        return self.slot_caption[np.asarray(slots, dtype=np.int64)]
