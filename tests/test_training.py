"""Training on cached frozen-backbone features: real emoji data and real offline towers, tiny sizes.

The feature cache is shared by the tests of this module (one directory per session), so the frozen towers run over
the 64 + 64 tiny-config images once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrank.encoders import load_checkpoint, read_checkpoint
from metrank.training import Trainer, config_from_dict, load_config, parse_overrides, train
from metrank.training.checkpoint import load_training_state
from metrank.training.config import ScheduleConfig
from metrank.training.optim import lr_factor
from metrank.training.trainer import evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def tiny_config(out_dir: Path, cache: Path, *overrides: str):
    return load_config(TINY, [f"output.dir={out_dir}", f"output.cache_dir={cache}", *overrides])


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, feature_cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = Trainer(tiny_config(out, feature_cache))
    untrained = evaluate(trainer.module, trainer.test_rows, [1, 5, 10], trainer.device)
    result = trainer.fit()
    result.untrained_test = untrained  # type: ignore[attr-defined]
    return result


def test_config_typo_names_the_nearest_key():
    with pytest.raises(ValueError, match=r"unknown config key 'train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(TINY, ["train.epoch=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'optimm'.*did you mean 'optim'"):
        config_from_dict({"optimm": {"lr": 0.1}})
    with pytest.raises(ValueError, match=r"'train\.batch_size' must be int, got 'many'"):
        load_config(TINY, ["train.batch_size=many"])


def test_overrides_are_typed_by_yaml():
    assert parse_overrides(["a.b=3", "a.c=1e-3", "d=[1, 2]", "e={k: 4}", "f=null", "g=true"]) == {
        "a": {"b": 3, "c": "1e-3"},
        "d": [1, 2],
        "e": {"k": 4},
        "f": None,
        "g": True,
    }
    cfg = load_config(TINY, ["optim.lr=1e-3", "loss.kwargs={temperature: 0.05}", "train.grad_clip=1"])
    assert cfg.optim.lr == 1e-3 and cfg.loss.kwargs == {"temperature": 0.05} and cfg.train.grad_clip == 1.0
    assert cfg.model.kwargs["image_size"] == 64  # kwargs from the file survive overrides of other keys


@pytest.mark.slow
@pytest.mark.data
def test_unknown_loss_lists_valid_names(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, "loss.name=tripplet")
    with pytest.raises(ValueError, match=r"unknown loss 'tripplet'; valid names: .*infonce.*triplet"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid names: adamw, sgd"):
        tiny_config(tmp_path, tmp_path, "optim.name=adam")


def test_cosine_schedule_with_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, 14, cfg) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(factors[9], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


@pytest.mark.slow
@pytest.mark.data
def test_training_improves_heldout_recall_and_exports_a_loadable_model(uninterrupted):
    result, untrained_test = uninterrupted, uninterrupted.untrained_test
    first, last = result.records[0], result.records[-1]
    assert first["epoch"] == 0 and last["epoch"] == 4 and result.completed
    # validation identities (carved from the training split, never trained on) pick the best epoch
    assert max(r["rsum"] for r in result.records) == result.best["value"] > first["rsum"]
    assert result.best["epoch"] == max(result.records, key=lambda r: r["rsum"])["epoch"]
    # test identities, touched only at the end: the trained model beats the untrained heads clearly
    assert result.metrics["rsum"] > untrained_test["rsum"] + 20, (untrained_test["rsum"], result.metrics["rsum"])

    losses = [r["loss"] for r in result.records[1:]]
    assert losses[-1] < losses[0]
    out = result.out_dir
    for name in (
        "metrics.jsonl",
        "metrics.csv",
        "curves.png",
        "config.yaml",
        "checkpoints/last.pt",
        "model_best.pt",
        "model_final.pt",
    ):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 5
    assert (out / "metrics.csv").read_text().startswith("epoch,")

    # the exported model is the frozen towers + trained heads: embedding the held-out data with it reproduces the
    # evaluated metrics (up to float noise of the backbone forward: at most 2 of 64 ranks may flip)
    from metrank.data import create_dataset
    from metrank.metrics import image_text_metrics

    model = load_checkpoint(out / "model_final.pt")
    assert read_checkpoint(out / "model_best.pt")["extra"]["test_metrics"] == result.metrics
    assert read_checkpoint(out / "model_final.pt")["extra"]["test_metrics"] == result.test_final
    test = create_dataset("emoji", split="test")
    keep = np.flatnonzero(test.image_labels < 32)
    images = [test.load_image(int(i)) for i in keep]
    captions = [test.captions[int(c)] for c in keep]  # emoji: caption i describes image i
    got = image_text_metrics(
        model.embed_images(images, progress=False),
        model.embed_texts(captions, progress=False),
        np.arange(len(keep)),
        image_labels=test.image_labels[keep],
        progress=False,
    )
    assert got["rsum"] == pytest.approx(result.test_final["rsum"], abs=2 * 100 / 64)


@pytest.mark.slow
@pytest.mark.data
def test_resume_after_interruption_gives_identical_weights(tmp_path, feature_cache, uninterrupted):
    out = tmp_path / "interrupted"
    # 3 batches of 16 per epoch (24 training identities): stop in the middle of epoch 2, then resume to the end
    stopped = train(tiny_config(out, feature_cache, "train.max_steps=5"))
    assert not stopped.completed and not (out / "model_final.pt").exists()
    state = load_training_state(out / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 2, 5)
    resumed = train(tiny_config(out, feature_cache), resume=True)
    assert resumed.completed

    reference = load_training_state(uninterrupted.out_dir / "checkpoints" / "last.pt")["module"]
    final = load_training_state(out / "checkpoints" / "last.pt")["module"]
    assert set(final) == set(reference) and "loss.loss.logit_scale" in final
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
    full_ref = read_checkpoint(uninterrupted.out_dir / "model_final.pt")["state_dict"]
    full_new = read_checkpoint(out / "model_final.pt")["state_dict"]
    for name in full_ref:
        assert torch.equal(full_new[name], full_ref[name]), name
    assert [r["epoch"] for r in resumed.records] == [0, 1, 2, 3, 4]
    assert resumed.records[-1]["rsum"] == uninterrupted.records[-1]["rsum"]
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.records[-1]["loss"] == pytest.approx(uninterrupted.records[-1]["loss"], rel=0, abs=0)


@pytest.mark.slow
@pytest.mark.data
def test_resume_refuses_a_changed_config(tmp_path, feature_cache, uninterrupted):
    with pytest.raises(ValueError, match=r"config changed since the checkpoint \(optim\.lr"):
        train(tiny_config(uninterrupted.out_dir, feature_cache, "optim.lr=0.5"), resume=True)


@pytest.mark.slow
@pytest.mark.data
def test_pk_sampler_with_too_few_samples_per_class_is_a_clear_error(tmp_path, feature_cache):
    # emoji identities have 2 images (google, twitter): K = 3 without replacement cannot be sampled
    cfg = load_config(
        REPO / "train" / "configs" / "emoji_instance.yaml",
        [
            f"output.dir={tmp_path}",
            f"output.cache_dir={feature_cache}",
            "data.max_classes=8",
            "model.kwargs.image_size=64",
            "sampler.kwargs={p: 4, k: 3, allow_replacement: false}",
        ],
    )
    with pytest.raises(ValueError, match=r"class\(es\) have fewer than k=3 items"):
        Trainer(cfg)


@pytest.mark.parametrize(
    "text, override",
    [
        ("task: [unclosed\n", None),
        ('task: !!python/object/apply:os.system ["echo pwned"]\n', None),
        ("task: image_text\n", "train.epochs=[1"),
    ],
)
def test_yaml_errors_are_one_line_config_errors(tmp_path, capsys, text, override):
    from metrank.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), *([override] if override else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metrank train: error:") and "YAML" in err and "Traceback" not in err
