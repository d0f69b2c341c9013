"""Two-process ``torchrun`` training (gloo on CPU): global negatives, rank-disjoint batches, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metrank.encoders import read_checkpoint
from metrank.training.checkpoint import load_training_state

REPO = Path(__file__).resolve().parents[1]


def torchrun(tmp_path: Path, free_port: int, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port),
        str(REPO / "train" / "train_image_text.py"),
        str(REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"),
        f"output.dir={out}",
        f"output.cache_dir={tmp_path / 'cache'}",
        "train.batch_size=8",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.data
def test_torchrun_two_processes_trains_and_writes_one_checkpoint(tmp_path, free_port):
    out = tmp_path / "ddp"
    proc = torchrun(tmp_path, free_port, out, "train.epochs=3")
    assert proc.stdout.count("test metrics of model_best.pt") == 1  # only rank 0 reports

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # one writer
    assert max(r["rsum"] for r in records[1:]) > records[0]["rsum"]
    state = load_training_state(out / "checkpoints" / "last.pt")
    # 48 training captions (24 identities x 2 vendors) in batches of 8: 6 batches per epoch, 3 per rank
    assert state["global_step"] == 3 * 3
    assert state["config"]["train"]["batch_size"] == 8
    assert torch.isfinite(state["module"]["loss.loss.logit_scale"]).all()
    assert read_checkpoint(out / "model_final.pt")["extra"]["test_metrics"]["rsum"] > 0
    assert len(list(out.rglob("*.tmp"))) == 0


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.data
def test_grad_cache_under_ddp_trains_like_plain_ddp(tmp_path, free_port):
    # GradCache is not DDP-wrapped: its gradients are all-reduced by hand; the weights must match plain DDP
    # SGD: Adam would turn float noise in gradients that are exactly 0 in theory (attention key biases) into steps
    tuned = ("train.epochs=1", "model.text.mode=last_n", "model.text.blocks=1", "optim.name=sgd", "optim.lr=0.5")
    torchrun(tmp_path, free_port, tmp_path / "plain", *tuned)
    torchrun(
        tmp_path, free_port + 1 if free_port < 65535 else free_port - 1, tmp_path / "gc", *tuned, "train.grad_cache=3"
    )
    plain = load_training_state(tmp_path / "plain" / "checkpoints" / "last.pt")["module"]
    cached = load_training_state(tmp_path / "gc" / "checkpoints" / "last.pt")["module"]
    assert set(plain) == set(cached) and any("text_backbone" in k for k in plain)
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-4, atol=1e-5, msg=name)
