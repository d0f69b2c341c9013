"""One-shot GPU check (< 5 min, unattended, one command): does everything that should run on CUDA run there and
agree with the CPU?

1. CUDA fine-tuning (a few steps of the tiny emoji config, LoRA image tower + last-N text tower) with bf16 autocast
   and GradCache, and the same run with GradCache off: the losses agree;
2. DDP over every visible GPU (``torchrun``-style processes, NCCL) of the same run: it completes, rank 0 writes;
3. FAISS GPU index build and search against the CPU ``IndexFlatIP``: the same neighbours;
4. metrics computed on GPU embeddings vs on the CPU: identical Recall@K.

The report goes to stdout and ``assets/gpu_check.txt``. Without CUDA it says so and exits 0 without writing.

    python eval/gpu_check.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny_emoji_image_text.yaml"
FINE_TUNE = ["model.image.mode=lora", "model.text.mode=last_n", "model.text.blocks=2", "train.epochs=2"]


def _train(out: Path, *overrides: str) -> dict:
    from metrank.training import load_config, train

    result = train(load_config(TINY, [f"output.dir={out}", "train.device=cuda", *FINE_TUNE, *overrides]))
    return {"loss": result.records[-1]["loss"], "rsum": result.metrics["rsum"], "s": round(result.wall_time_s, 1)}


def check_training(tmp: Path) -> list[str]:
    plain = _train(tmp / "plain", "train.amp=true")
    cached = _train(tmp / "gradcache", "train.amp=true", "train.grad_cache=4")
    ok = abs(plain["loss"] - cached["loss"]) < 5e-2
    return [
        f"fine-tune bf16: {plain}",
        f"fine-tune bf16 + GradCache(4): {cached}",
        f"GradCache loss matches: {'OK' if ok else 'MISMATCH'}",
    ]


def check_ddp(tmp: Path) -> list[str]:
    n = torch.cuda.device_count()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        "-m",
        "metrank.cli",
        "train",
        str(TINY),
        f"output.dir={tmp / 'ddp'}",
        "train.device=cuda",
        "train.amp=true",
        *FINE_TUNE,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
    ok = proc.returncode == 0 and (tmp / "ddp" / "model_best.pt").is_file()
    tail = "" if ok else " " + proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return [f"DDP over {n} GPU(s): {'OK' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s{tail}"]


def check_faiss() -> list[str]:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return ["FAISS GPU: not available in this faiss build (install faiss-gpu); skipped"]
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20000, 64)).astype(np.float32)
    query = rng.standard_normal((500, 64)).astype(np.float32)
    cpu = faiss.IndexFlatIP(64)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(64))
    gpu.add(base)
    _, i_cpu = cpu.search(query, 10)
    _, i_gpu = gpu.search(query, 10)
    agree = float((i_cpu == i_gpu).mean())
    return [f"FAISS GPU IndexFlatIP vs CPU: {agree:.4f} of top-10 ids equal ({'OK' if agree > 0.99 else 'MISMATCH'})"]


def check_metrics() -> list[str]:
    from metrank.metrics import image_text_metrics

    rng = np.random.default_rng(1)
    images = torch.nn.functional.normalize(torch.randn(300, 32), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.5 * torch.randn(300, 32), dim=-1)
    sim_gpu = (images.cuda() @ texts.cuda().T).cpu()
    sim_cpu = images @ texts.T
    caption_image = rng.permutation(300)
    a = image_text_metrics(images.numpy(), texts[caption_image].numpy(), caption_image, progress=False)
    b = image_text_metrics(
        images.cuda().cpu().numpy(), texts.cuda()[caption_image].cpu().numpy(), caption_image, progress=False
    )
    diff = float((sim_gpu - sim_cpu).abs().max())
    return [
        f"metrics on GPU-held embeddings == CPU: {'OK' if a == b else 'MISMATCH'}; max |S_gpu - S_cpu| = {diff:.2e}"
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing to check here. "
            "Run this on a machine with a GPU: python eval/gpu_check.py"
        )
        return 0
    start = time.perf_counter()
    lines = [f"gpu_check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        checks = [
            ("training", lambda: check_training(Path(tmp))),
            ("ddp", lambda: check_ddp(Path(tmp))),
            ("faiss", check_faiss),
            ("metrics", check_metrics),
        ]
        for name, check in checks:
            try:
                lines += check()
            except Exception as err:  # report every check, whatever one of them raises
                lines.append(f"{name}: FAILED with {type(err).__name__}: {err}")
            print(lines[-1], flush=True)
    lines.append(f"total {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "assets" / "gpu_check.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    return 0 if "FAILED" not in text and "MISMATCH" not in text else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
