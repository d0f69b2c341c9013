"""Encoders: pretrained weights reproduce their reference implementations; RetrievalModel contract; checkpoints.

References: the EfficientNet-Lite reference package (PyPI ``efficientnet-lite-pytorch``, test dependency) for the
Lite0 logits and pooled features; Hugging Face ``transformers`` with the all-MiniLM-L6-v2 model card's mean pooling
for the text tower; open_clip's own ``encode_image``/``encode_text`` for the projection split.
"""

import os

import numpy as np
import pytest
import torch

from metrank.encoders import (
    MODELS,
    GeneralizedMeanPooling,
    create_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from metrank.encoders.pretrained import lite0_weights_path, minilm_path

TUX_PHOTOS = [
    "/usr/share/tuxpaint/stamps/animals/birds/chicken_profile.png",
    "/usr/share/tuxpaint/stamps/animals/birds/crowned_crane.png",
]


@pytest.fixture(scope="module")
def lite0_minilm():
    torch.manual_seed(0)
    return create_model("lite0-minilm", image_size=96)


@pytest.fixture(scope="module")
def lite0():
    return create_model("lite0")


@pytest.fixture(scope="module")
def reference_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_weights_path()).eval()


@pytest.fixture(scope="module")
def real_images():
    from metrank.data import open_rgb

    return [open_rgb(p) for p in TUX_PHOTOS]


def test_timm_lite0_reproduces_reference_logits(lite0, reference_lite0, real_images):
    import timm

    from metrank.encoders import load_lite0_imagenet_weights

    timm_lite0 = load_lite0_imagenet_weights(timm.create_model("tf_efficientnet_lite0")).eval()
    model = lite0
    pixels = torch.cat(
        [
            torch.stack([model.image_transform(im) for im in real_images]),
            torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
        ]
    )
    with torch.no_grad():
        ours, reference = timm_lite0(pixels), reference_lite0(pixels)
        assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
        assert torch.equal(ours.argmax(1), reference.argmax(1))
        # the RetrievalModel backbone is the pooled trunk: reference extract_features + global average pool
        pooled = reference_lite0.extract_features(pixels).mean(dim=(2, 3))
        assert torch.allclose(model.image_features(pixels), pooled, atol=1e-4)
    # real photos get confident ImageNet predictions (a hen photo -> 'hen' class 8)
    assert ours[0].argmax().item() == 8


def test_minilm_text_features_match_transformers_mean_pooling(lite0_minilm):
    from transformers import AutoModel, AutoTokenizer

    texts = ["A blackbird.", "grinning face with smiling eyes, grin", "x"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    reference = AutoModel.from_pretrained(minilm_path()).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)  # the model card's mean pooling
        ours = lite0_minilm.text_features(lite0_minilm.tokenize(texts))
    assert ours.shape == (3, 384)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_lite0_minilm_embeds_real_images_and_texts(lite0_minilm, real_images):
    model = lite0_minilm
    assert (
        model.has_text
        and model.embed_dim == 256
        and model.config == {"name": "lite0-minilm", "kwargs": {"image_size": 96}}
    )
    image_emb = model.embed_images(real_images + TUX_PHOTOS[:1], batch_size=2, progress=False)
    assert image_emb.dtype == np.float32 and image_emb.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(image_emb[0], image_emb[2], atol=1e-5)  # PIL image and its path embed alike
    texts = ["a chicken", "a crowned crane", "a chicken"]
    text_emb = model.embed_texts(texts, progress=False)
    assert text_emb.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(text_emb[0], text_emb[2])  # identical strings, identical embeddings
    assert not np.allclose(text_emb[0], text_emb[1], atol=1e-3)
    # batching does not change results beyond float rounding
    np.testing.assert_allclose(model.embed_texts(texts, batch_size=2, progress=False), text_emb, atol=1e-6)
    # embed_* equals the tensor path: normalise(head(features))
    with torch.no_grad():
        tokens = model.tokenize(texts[:2])
        direct = torch.nn.functional.normalize(model.text_head(model.text_features(tokens)), dim=-1)
    np.testing.assert_allclose(text_emb[:2], direct.numpy(), atol=1e-5)
    model.train()
    model.embed_texts(texts[:1], progress=False)
    assert model.training
    model.eval()


def test_tokenize_rejects_empty_text(lite0_minilm):
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        lite0_minilm.tokenize(["a cat", "   "])
    with pytest.raises(ValueError, match="empty"):
        lite0_minilm.embed_texts([""], progress=False)
    with pytest.raises(ValueError, match="has no text tower"):
        create_model("lite0", pretrained=False, image_size=32).tokenize(["a cat"])


def test_checkpoint_round_trip_restores_every_weight(tmp_path, lite0_minilm, real_images):
    model = lite0_minilm
    with torch.no_grad():  # trained heads: differ from anything the packages could provide
        model.image_projection.proj.weight.add_(0.01 * torch.randn_like(model.image_projection.proj.weight))
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, epoch=3, metrics={"R@1": 0.5})
    assert os.listdir(path.parent) == ["model.pt"]  # atomic write left no temporary file
    loaded, extra = load_checkpoint(path, with_extra=True)
    assert extra == {"epoch": 3, "metrics": {"R@1": 0.5}} and loaded.config == model.config
    np.testing.assert_array_equal(
        loaded.embed_images(real_images, progress=False), model.embed_images(real_images, progress=False)
    )
    np.testing.assert_array_equal(
        loaded.embed_texts(["a hen"], progress=False), model.embed_texts(["a hen"], progress=False)
    )
    assert read_checkpoint(path)["format"] == "metrank.encoder.v1"
    with pytest.raises(ValueError, match="only tensors"):
        save_checkpoint(tmp_path / "bad.pt", model, sampler=object())
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a metrank encoder checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_model_names_list_valid_ones(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on machines without a model hub
    with pytest.raises(ValueError, match="no offline pretrained weights for timm/resnet18.*pretrained=False"):
        create_model("timm/resnet18")
    with pytest.raises(ValueError, match="lite0-minilm"):
        create_model("resnet-minilm")
    with pytest.raises(ValueError, match="timm/<name>"):
        create_model("hub/foo")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm/not_a_model", pretrained=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("timm/resnet18", pretrained="/nonexistent/weights.pth")
    assert {"lite0", "lite0-minilm", "timm", "open_clip"} <= set(MODELS.names())


def test_pooling_against_numpy(lite0):
    x = torch.rand(2, 5, 3, 4, dtype=torch.float64) + 0.1
    gem = GeneralizedMeanPooling(p=3.0).double()
    expected = np.mean(x.numpy() ** 3, axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(gem(x).detach().numpy(), expected, rtol=1e-12)
    gem.p.data.fill_(1.0)
    np.testing.assert_allclose(gem(x).detach().numpy(), x.numpy().mean(axis=(2, 3)), rtol=1e-12)
    assert torch.autograd.gradcheck(GeneralizedMeanPooling(p=2.5).double(), (x.requires_grad_(),))
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = lite0.image_backbone.forward_features(pixels)
        assert torch.allclose(lite0.image_features(pixels), fmap.mean(dim=(2, 3)), atol=1e-5)
        max_pooled = create_model("lite0", pooling="max", image_size=64).image_features(pixels)
        assert torch.allclose(max_pooled, fmap.amax(dim=(2, 3)), atol=1e-5)
        gem = create_model("lite0", pooling="gem", image_size=64)
        assert isinstance(gem.image_backbone.global_pool, GeneralizedMeanPooling)
        assert torch.allclose(
            gem.image_features(pixels), fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3), atol=1e-4
        )


def test_freezing_stops_gradients_and_batchnorm_updates():
    frozen = create_model("lite0", freeze_image=True, image_size=32)
    assert not any(p.requires_grad for p in frozen.image_backbone.parameters())
    assert all(p.requires_grad for p in frozen.image_projection.parameters())
    before = {k: v.clone() for k, v in frozen.image_backbone.state_dict().items()}
    frozen.train()
    frozen.encode_image(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in frozen.image_backbone.state_dict().items())
    partial = create_model("lite0", freeze_image=True, unfreeze_image_last=1, image_size=32)
    trainable = {n.split(".")[0] for n, p in partial.image_backbone.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "conv_head", "bn2"}
    assert not partial.image_backbone.blocks[5][0].conv_pw.weight.requires_grad
    assert partial.image_backbone.blocks[6][0].conv_pw.weight.requires_grad
    with pytest.raises(ValueError, match="layer groups"):
        create_model("lite0", pretrained=False, freeze_image=True, unfreeze_image_last=50)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def test_open_clip_split_matches_open_clip_encoders(tmp_path):
    """Projections lifted out of open_clip's ViT and text transformer give open_clip's own embeddings."""
    import open_clip

    from metrank.encoders.clip_model import register_open_clip_config

    config = register_open_clip_config("tiny-vit", TINY_CLIP)
    torch.manual_seed(0)
    clip = open_clip.create_model(config, force_custom_text=True).eval()
    torch.manual_seed(0)
    model = create_model(f"open_clip/{config}", pretrained=None)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a dog", "a cat on a mat"])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), clip.encode_image(pixels, normalize=True), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), clip.encode_text(tokens, normalize=True), atol=1e-5)
        assert model.image_features(pixels).shape == (2, 64) and model.text_features(tokens).shape == (2, 64)
    path = save_checkpoint(tmp_path / "vit.pt", model)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).encode_image(pixels), model.encode_image(pixels))
    with pytest.raises(ValueError, match="pretrained=<tag>"):
        create_model(f"open_clip/{config}", pretrained=True)
    with pytest.raises(ValueError, match="unknown open_clip config"):
        create_model("open_clip/not-a-config", pretrained=None)
