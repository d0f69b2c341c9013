"""The regularisers of issue 9 beyond the modes: layer-wise learning-rate decay, captions sampled per epoch, and the
training-split probe that gives train vs held-out curves. Real emoji data and real offline towers, tiny config."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from metrank.errors import ConfigError
from metrank.training import Trainer, load_config
from metrank.training.caption_sampling import CaptionSlots

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"
PHRASES = "data.train_kwargs={caption_mode: phrases}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def tiny(out: Path, cache: Path, *overrides: str):
    return load_config(TINY, [f"output.dir={out}", f"output.cache_dir={cache}", *overrides])


def expected_scale(name: str, decay: float) -> float:
    """BEiT/ELECTRA layer decay written out for the offline towers: EfficientNet-Lite0 has 7 stages (``blocks.i``),
    MiniLM 6 layers; block i of n trains at decay ** (n - i), the stem at decay ** (n + 1), the tail at decay ** 0."""
    if name.startswith("image_backbone."):
        n, match = 7, re.match(r"image_backbone\.blocks\.(\d+)\.", name)
        stem = name.startswith(("image_backbone.conv_stem.", "image_backbone.bn1."))
    else:
        n, match = 6, re.match(r"text_backbone\.transformer\.encoder\.layer\.(\d+)\.", name)
        stem = name.startswith("text_backbone.transformer.embeddings.")
    if match:
        return decay ** (n - int(match.group(1)))
    return decay ** (n + 1) if stem else 1.0


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize(
    "overrides",
    [
        ("model.image.mode=full", "model.text.mode=full"),
        ("model.image.mode=lora", "model.text.mode=lora", "model.image.lora_r=2", "model.text.lora_r=2"),
        ("model.image.mode=last_n", "model.image.blocks=3", "model.text.mode=last_n", "model.text.blocks=2"),
    ],
    ids=["full", "lora", "last_n"],
)
def test_layer_decay_gives_every_backbone_parameter_lr_times_decay_to_the_depth(overrides, tmp_path, cache):
    decay, backbone_lr, head_lr = 0.6, 1e-3, 2e-3
    trainer = Trainer(
        tiny(
            tmp_path,
            cache,
            *overrides,
            f"optim.layer_decay={decay}",
            f"optim.backbone_lr={backbone_lr}",
            f"optim.lr={head_lr}",
            "model.text.lr=5e-4",
        )
    )
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr_of = {
        names[id(p)]: g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"] if id(p) in names
    }
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(lr_of) == trained
    scales = set()
    for name, lr in lr_of.items():
        if name.startswith(("image_projection.", "text_projection.")):
            assert lr == pytest.approx(head_lr, rel=1e-12), name
            continue
        base = backbone_lr if name.startswith("image_backbone.") else 5e-4
        scale = expected_scale(name, decay)
        scales.add(round(scale, 9))
        assert lr == pytest.approx(base * scale, rel=1e-12), name
    assert len(scales) >= 3  # several depths really got different rates
    if "lora" in overrides[0]:
        assert any("lora_A" in n for n in lr_of)


@pytest.mark.slow
@pytest.mark.data
def test_layer_decay_out_of_range_is_a_config_error(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"optim\.layer_decay must be in \(0, 1\]"):
        tiny(tmp_path, cache, "optim.layer_decay=1.5")


def test_caption_slots_draw_other_captions_each_epoch_deterministically():
    # image 0: 4 captions, image 1: 1 caption, image 2: none, image 3: 3 captions (interleaved order)
    caption_image = np.array([0, 3, 0, 1, 3, 0, 3, 0])
    slots = CaptionSlots(caption_image, 4, per_image=2, seed=5)
    assert len(slots) == 2 + 1 + 0 + 2
    np.testing.assert_array_equal(slots.slot_image, [0, 0, 1, 3, 3])
    seen: dict[int, set] = {0: set(), 3: set()}
    draws = []
    for epoch in range(1, 9):
        slots.set_epoch(epoch)
        drawn = slots.captions(np.arange(len(slots)))
        np.testing.assert_array_equal(caption_image[drawn], slots.slot_image)  # a slot holds its image's caption
        assert drawn[0] != drawn[1] and drawn[3] != drawn[4]  # without replacement within an epoch
        seen[0] |= set(drawn[:2].tolist())
        seen[3] |= set(drawn[3:].tolist())
        draws.append(drawn.copy())
    assert seen[0] == {0, 2, 5, 7} and seen[3] == {1, 4, 6}  # over epochs every caption comes up
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    again = CaptionSlots(caption_image, 4, per_image=2, seed=5)
    for epoch, drawn in enumerate(draws, start=1):
        again.set_epoch(epoch)
        np.testing.assert_array_equal(again.captions(np.arange(len(again))), drawn)  # same seed, same draws
    other = CaptionSlots(caption_image, 4, per_image=2, seed=6)
    differs = []
    for epoch, drawn in enumerate(draws, start=1):
        other.set_epoch(epoch)
        differs.append(not np.array_equal(other.captions(np.arange(len(other))), drawn))
    assert any(differs)


@pytest.mark.slow
@pytest.mark.data
def test_trainer_pairs_an_image_with_other_captions_in_other_epochs(tmp_path, cache):
    def batches(trainer: Trainer, epoch: int) -> dict[int, str]:
        trainer._set_epoch(epoch)
        assert trainer.slots is not None
        captions = {}
        for indices in trainer.sampler:
            for slot in indices:
                caption = int(trainer.slots.captions(np.array([slot]))[0])
                captions[int(trainer.slots.slot_image[slot])] = trainer.train_sel.captions[caption]
        return captions

    trainer = Trainer(tiny(tmp_path, cache, PHRASES, "data.captions_per_image=1", "train.batch_size=8"))
    n_images = len(trainer.train_sel.image_index)
    assert len(trainer.slots) == n_images < len(trainer.train_sel.captions)  # one slot per image, more phrases
    first, second = batches(trainer, 1), batches(trainer, 2)
    several = [i for i in range(n_images) if np.sum(trainer.train_sel.caption_image == i) > 1]
    assert several and any(first.get(i) != second.get(i) for i in several if i in first and i in second)
    twin = Trainer(tiny(tmp_path / "twin", cache, PHRASES, "data.captions_per_image=1", "train.batch_size=8"))
    assert batches(twin, 2) == second and batches(twin, 1) == first  # deterministic by seed


@pytest.mark.slow
@pytest.mark.data
def test_training_probe_is_a_fixed_train_subset_the_size_of_validation_and_is_logged(tmp_path, cache):
    trainer = Trainer(tiny(tmp_path, cache, "train.epochs=1"))
    probe, val, train_sel = trainer.probe_sel, trainer.val_sel, trainer.train_sel
    assert probe is not None and val is not None
    probe_ids = set(probe.image_ids.tolist())
    assert len(probe_ids) == len(set(val.image_ids.tolist()))
    assert probe_ids <= set(train_sel.image_ids.tolist()) and not probe_ids & set(val.image_ids.tolist())
    result = trainer.fit()
    for record in result.records:
        assert {"train_t2i_R@1", "train_i2t_R@1", "train_rsum", "t2i_R@1"} <= set(record)
    # after training on them, the training identities are retrieved at least as well as at the start
    assert result.records[-1]["train_rsum"] >= result.records[0]["train_rsum"]
    assert Trainer(tiny(tmp_path / "off", cache, "eval.train_probe=false")).probe_rows is None
