"""Training modes per tower (heads / last_n / lora / full) on real emoji data with the real offline towers.

* ``last_n`` with the cached frozen prefix gives the loss and gradients of the whole model with those blocks frozen;
* LoRA and partial (last_n) checkpoints reload (``load_checkpoint``, ``weights_only``) to the embeddings training saw;
* resume is bit-exact in every mode (augmented images included: the transform's RNG is part of the state);
* bad settings are ``ConfigError``s naming the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrank.encoders import load_checkpoint
from metrank.errors import ConfigError
from metrank.training import Trainer, load_config, train
from metrank.training.checkpoint import load_training_state
from metrank.training.trainer import embed_rows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"
LAST_N = ("model.image.mode=last_n", "model.image.blocks=2", "model.text.mode=last_n", "model.text.blocks=1")
LORA = ("model.image.mode=lora", "model.text.mode=lora", "model.image.lora_r=2", "model.text.lora_r=2")

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def tiny(out: Path, cache: Path, *overrides: str):
    return load_config(TINY, [f"output.dir={out}", f"output.cache_dir={cache}", *overrides])


def test_last_n_with_cached_prefix_equals_the_frozen_full_model(tmp_path, cache, one_torch_thread):
    trainer = Trainer(tiny(tmp_path, cache, *LAST_N))
    module, rows, model = trainer.module, trainer.train_rows, trainer.model
    module.train()
    captions = torch.arange(12)
    images = rows.caption_image[captions]
    ids = rows.image_ids[images]
    loss = module(rows.image.take(images, trainer.device), rows.text.take(captions, trainer.device), ids)
    loss.backward()
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("image_backbone.blocks.6" in n for n in cached) and not any("blocks.4." in n for n in cached)
    module.zero_grad(set_to_none=True)

    # reference: the whole model on pixels and tokens, everything but the trained blocks frozen
    pixels = torch.stack([model.image_transform(trainer.train_sel.load_image(int(i))) for i in images])
    tokens = model.tokenize([trainer.train_sel.captions[int(c)] for c in captions])
    image_emb = torch.nn.functional.normalize(model.image_head(model.image_features(pixels)), dim=-1)
    text_emb = torch.nn.functional.normalize(model.text_head(model.text_features(tokens)), dim=-1)
    reference = trainer.loss(image_emb, text_emb, ids)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for name, grad in cached.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["last_n", "lora"])
def test_partial_and_lora_checkpoints_reload_to_the_trained_embeddings(mode, tmp_path, cache):
    overrides = LAST_N if mode == "last_n" else LORA
    trainer = Trainer(tiny(tmp_path, cache, *overrides, "train.epochs=1"))
    result = trainer.fit()
    trainer.module.eval()
    seen_images = embed_rows(trainer.module.embed_images, trainer.test_rows.image, trainer.device, 64)
    seen_texts = embed_rows(trainer.module.embed_texts, trainer.test_rows.text, trainer.device, 64)

    model = load_checkpoint(result.out_dir / "model_final.pt")
    if mode == "lora":
        assert model.config["tuning"]["image"]["lora"]["r"] == 2
        assert any("lora_A" in n for n, _ in model.named_parameters())  # kept as adapters, not merged
    sel = trainer.test_sel
    images = model.embed_images([sel.load_image(i) for i in range(len(sel.image_index))], progress=False)
    texts = model.embed_texts(sel.captions, progress=False)
    np.testing.assert_allclose(images, seen_images.numpy(), atol=1e-5)
    np.testing.assert_allclose(texts, seen_texts.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        LAST_N,
        LORA,
        ("model.image.mode=full", "data.augment=true", "train.ema=0.9"),
        ("model.image.mode=lora", "model.text.mode=last_n", "model.text.blocks=2", "train.grad_cache=5"),
        (
            "model.image.mode=heads",
            "model.text.mode=full",
            "optim.layer_decay=0.7",
            "data.train_kwargs={caption_mode: phrases}",
            "data.captions_per_image=1",
        ),
    ],
    ids=["last_n", "lora", "full-augment-ema", "lora-last_n-gradcache", "text-full-layer_decay-captions"],
)
def test_resume_is_bit_exact_in_every_mode(overrides, tmp_path, cache):
    common = (*overrides, "train.epochs=2")
    whole = train(tiny(tmp_path / "whole", cache, *common))
    stopped = train(tiny(tmp_path / "split", cache, *common, "train.max_steps=4"))
    assert not stopped.completed
    resumed = train(tiny(tmp_path / "split", cache, *common), resume=True)
    a = load_training_state(whole.out_dir / "checkpoints" / "last.pt")
    b = load_training_state(resumed.out_dir / "checkpoints" / "last.pt")
    assert set(a["module"]) == set(b["module"]) and len(a["module"]) > 2
    for name, value in a["module"].items():
        assert torch.equal(value, b["module"][name]), name
    assert resumed.metrics == whole.metrics


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.image.mode=last_n", "model.image.blocks=9"), r"blocks=9 but this efficientnet backbone has 7 blocks"),
        (("model.text.mode=lora", "model.text.lora_targets=[nothing_here]"), r"set model\.text\.lora_targets to"),
        (("model.image.mode=lora", "model.image.lora_targets=[conv_dw]"), r"depthwise.*conv_pw"),
        (("train.grad_cache=4",), r"nothing to chunk"),
        (("data.augment=true",), r"data\.augment has no effect.*model\.image\.mode"),
        (("model.kwargs.freeze_image=true",), r"set model\.image\.mode"),
        (("loss.name=cprd", "loss.teacher.checkpoint=TEACHER"), r"trained on other features.*checkpoint=null"),
    ],
    ids=["blocks", "lora-targets", "lora-depthwise", "gradcache-heads", "augment-heads", "freeze-kwargs", "teacher"],
)
def test_bad_settings_are_config_errors_naming_the_fix(overrides, message, tmp_path, cache):
    if "loss.teacher.checkpoint=TEACHER" in overrides:  # a teacher trained on 64-d features of another model
        first = Trainer(
            tiny(tmp_path / "t", cache, "loss.name=cprd", "loss.teacher.epochs=1", "model.kwargs.image_size=32")
        )
        assert first is not None
        overrides = ("loss.name=cprd", f"loss.teacher.checkpoint={tmp_path / 't' / 'teacher.pt'}")
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny(tmp_path, cache, *overrides))


def test_phrase_captions_train_while_validation_reads_captions_as_the_test_split(tmp_path, cache):
    trainer = Trainer(tiny(tmp_path, cache, "data.train_kwargs={caption_mode: phrases}"))
    train_sel, val_sel, test_sel = trainer.train_sel, trainer.val_sel, trainer.test_sel
    assert val_sel is not None
    assert len(train_sel.captions) > len(train_sel.image_index)  # several phrases per image
    assert len(val_sel.captions) == len(val_sel.image_index) and len(test_sel.captions) == len(test_sel.image_index)
    assert not set(train_sel.image_ids) & set(val_sel.image_ids)  # identity-disjoint
