"""Every registered loss trains one real step through ``metrank train`` on a tiny config, so a broken combination of
loss and trainer (a calling-convention mismatch, a missing teacher, ...) fails CI. Real emoji data, real towers."""

from __future__ import annotations

from pathlib import Path

import pytest

from metrank.cli import main
from metrank.losses import LOSSES, is_paired
from metrank.training.checkpoint import load_training_state

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"
INSTANCE = REPO / "train" / "configs" / "emoji_instance.yaml"
# losses that need settings beyond their defaults to fit a 16-pair batch
EXTRA = {"contextual": ["loss.kwargs={k: 2}"], "cprd": ["loss.teacher.epochs=1"], "logit_kd": ["loss.teacher.epochs=1"]}
METRIC_ONLY = {"xbm"}  # takes its references from its own memory: class-label training only


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def run_one_step(config: Path, out: Path, cache: Path, *overrides: str) -> dict:
    rc = main(["train", str(config), f"output.dir={out}", f"output.cache_dir={cache}", "train.max_steps=1", *overrides])
    assert rc == 0
    return load_training_state(out / "checkpoints" / "last.pt")


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_a_step_through_metrank_train(name, tmp_path, cache):
    if name in METRIC_ONLY:
        state = run_one_step(
            INSTANCE,
            tmp_path,
            cache,
            f"loss.name={name}",
            "data.max_classes=16",
            "model.kwargs.image_size=64",
            "sampler.kwargs={p: 4, k: 2}",
            "train.batch_size=8",
        )
    else:
        state = run_one_step(TINY, tmp_path, cache, f"loss.name={name}", *EXTRA.get(name, []))
    assert state["global_step"] == 1
    # the step changed the trained weights: the optimizer state holds moments for them
    assert any(s for s in state["optimizer"]["state"].values())
    if is_paired(name):
        assert not any(k.startswith("loss.loss.") for k in state["module"])  # used as is, not wrapped


@pytest.mark.slow
@pytest.mark.data
def test_metric_only_and_paired_losses_name_the_fix(tmp_path, cache, capsys):
    assert main(["train", str(TINY), f"output.dir={tmp_path}", f"output.cache_dir={cache}", "loss.name=xbm"]) == 2
    assert "loss.memory_size" in capsys.readouterr().err
    rc = main(["train", str(INSTANCE), f"output.dir={tmp_path}", f"output.cache_dir={cache}", "loss.name=siglip"])
    assert rc == 2
    assert "for task=metric use a pairwise loss" in capsys.readouterr().err
