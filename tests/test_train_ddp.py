"""Two-process ``torchrun`` training (gloo on CPU): global negatives, rank-disjoint batches, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from metrank.encoders import read_checkpoint
from metrank.training.checkpoint import load_training_state

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_trains_and_writes_one_checkpoint(tmp_path, free_port):
    out = tmp_path / "ddp"
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
        "train.epochs=3",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("held-out metrics after the last epoch") == 1  # only rank 0 reports

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # one writer
    assert records[-1]["rsum"] > records[0]["rsum"]
    state = load_training_state(out / "checkpoints" / "last.pt")
    # 64 training captions in batches of 8: 8 batches per epoch, 4 per rank (each step sees 2 x 8 captions)
    assert state["global_step"] == 3 * 4
    assert state["config"]["train"]["batch_size"] == 8
    assert torch.isfinite(state["module"]["loss.loss.logit_scale"]).all()
    assert read_checkpoint(out / "model_final.pt")["extra"]["train_metrics"]["rsum"] == records[-1]["rsum"]
    assert len(list(out.rglob("*.tmp"))) == 0
