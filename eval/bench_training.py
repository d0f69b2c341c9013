"""Training throughput and memory per tower mode, and GradCache's flat memory at growing InfoNCE batches.

Part 1 (``--batch``, default 256): one optimizer step (forward + backward + AdamW) of the offline two-tower model
(EfficientNet-Lite0 + MiniLM, ``--image-size`` px, ``--context`` tokens) in each mode of ``metrank.training``:
``heads`` (cached features), ``last_n`` (cached frozen prefix, last ``--blocks`` blocks of both towers), ``lora`` and
``full``; samples/s, peak memory added by the step, and the share of the loss (symmetric InfoNCE) in the step.
Part 2 (``--gc-batches``, default 512 1024 2048 4096): the same step in ``--gc-mode`` (default ``last_n``) with and
without GradCache (chunks of ``--chunk``): peak memory must stay flat with it, and grow with the batch without it.

Each measurement runs in a fresh forked process (peak RSS on CPU, ``max_memory_allocated`` on CUDA); inputs are
random pixels / token ids of the real tokenizer (data loading is not measured). The machine may be shared: compare
the rows of one run, not absolute numbers across runs.

    python eval/bench_training.py                                   # full size (minutes on 2 cores)
    python eval/bench_training.py --batch 16 --gc-batches 32 64 --chunk 16 --steps 1   # quick check
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from metrank.encoders import create_model
from metrank.encoders.tuning import apply_tuning, lora_settings, tower_backbone, trainable_parameter_names
from metrank.losses import CrossModalLoss, InfoNCELoss
from metrank.metrics import format_table
from metrank.training.config import TowerConfig
from metrank.training.gradcache import grad_cache_backward
from metrank.training.towers import Tower, TrainModule

MODES = ("heads", "last_n", "lora", "full")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs`` 5), so the peak measured
    is the step's, not the input preparation's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def build(mode: str, args: argparse.Namespace, batch: int, device: torch.device) -> tuple[TrainModule, Any, Any, Any]:
    """A TrainModule in ``mode`` and one batch of its inputs (image rows, caption rows, ids)."""
    torch.manual_seed(0)
    model = create_model(
        "lite0-minilm", pretrained=False, embed_dim=256, image_size=args.image_size, context_length=args.context
    ).to(device)
    pixels = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    words = ["grinning", "face", "with", "smiling", "eyes", "red", "apple", "arrow", "pointing", "left"]
    tokens = model.tokenize([" ".join(words[(i + j) % 10] for j in range(1 + i % 9)) for i in range(batch)]).to(device)
    towers, rows = {}, {}
    for tower, raw in (("image", pixels), ("text", tokens)):
        spec = TowerConfig(mode=mode, blocks=args.blocks)
        backbone = tower_backbone(model, tower)
        with torch.no_grad():
            if mode == "heads":
                rows[tower] = model.image_features(raw) if tower == "image" else model.text_features(raw)
            elif mode == "last_n":
                towers[tower] = Tower(model, tower, mode, args.blocks, cached_prefix=True)
                parts = [towers[tower].split.prefix(raw[i : i + 256], args.blocks) for i in range(0, batch, 256)]
                rows[tower] = tuple(torch.cat(p) for p in zip(*parts))
            else:
                rows[tower] = raw
        if mode == "lora":
            apply_tuning(model, {tower: {"lora": lora_settings(spec, backbone)}})
        towers.setdefault(tower, Tower(model, tower, mode, args.blocks, cached_prefix=mode == "last_n"))
    names = [n for t in ("image", "text") for n in trainable_parameter_names(model, t, mode, args.blocks)]
    module = TrainModule(
        model, towers["image"], towers["text"], CrossModalLoss(InfoNCELoss()), "image_text", None, names
    )
    module.to(device).train()
    return module, rows["image"], rows["text"], torch.arange(batch, device=device)


def measure(mode: str, args: argparse.Namespace, batch: int, chunk: int | None, out: Any) -> None:
    """Child process: time ``args.steps`` optimizer steps after one warm-up step; report peak memory."""
    device = torch.device(args.device)
    module, images, texts, ids = build(mode, args, batch, device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        if chunk is None:
            module(images, texts, ids).backward()
        else:
            grad_cache_backward(
                module.embed_images, module.embed_texts, module.loss_of, images, texts, ids, chunk, device
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up (allocator, AdamW state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak()
        base = _rss_mb()
    seconds = sum(step() for _ in range(args.steps)) / args.steps
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _peak_mb() - base
    with torch.no_grad():
        img, txt = module.embed_images(images).detach(), module.embed_texts(texts).detach()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    start = time.perf_counter()
    for _ in range(args.steps):
        module.loss_of(img, txt, ids).backward()
    loss_s = (time.perf_counter() - start) / args.steps
    out.put(
        {"samples/s": batch / seconds, "step s": seconds, "peak MB": max(peak, 0.0), "loss share": loss_s / seconds}
    )


def run(mode: str, args: argparse.Namespace, batch: int, chunk: int | None = None) -> dict[str, float]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(mode, args, batch, chunk, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--gc-batches", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--gc-mode", default="last_n", choices=MODES[1:], help="the mode of the GradCache sweep")
    parser.add_argument("--blocks", type=int, default=1, help="last_n: trained blocks of each tower")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 is faster on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)

    rows = {mode: run(mode, args, args.batch) for mode in args.modes}
    if rows:
        print(f"\none optimizer step at batch {args.batch} ({args.image_size} px, {args.context} tokens):")
        print(format_table(list(rows.values()), names=list(rows)))
    if "full" in rows and "heads" in rows:
        print(f"full / heads step time: {rows['full']['step s'] / rows['heads']['step s']:.0f}x")

    if args.gc_batches:
        gc_rows = {}
        for batch in args.gc_batches:
            gc_rows[f"B={batch} plain"] = run(args.gc_mode, args, batch)
            gc_rows[f"B={batch} GradCache({args.chunk})"] = run(args.gc_mode, args, batch, args.chunk)
        what = (
            f"cached prefix, last {args.blocks} block(s) of both towers" if args.gc_mode == "last_n" else "both towers"
        )
        print(f"\nInfoNCE, {args.gc_mode} ({what}):")
        print(format_table(list(gc_rows.values()), names=list(gc_rows)))
        first, last = args.gc_batches[0], args.gc_batches[-1]
        plain_growth = gc_rows[f"B={last} plain"]["peak MB"] / max(gc_rows[f"B={first} plain"]["peak MB"], 1e-9)
        cached = [gc_rows[f"B={b} GradCache({args.chunk})"]["peak MB"] for b in args.gc_batches]
        print(
            f"peak memory B={last} vs B={first}: plain x{plain_growth:.1f}, GradCache "
            f"x{cached[-1] / max(cached[0], 1e-9):.1f} (the B x B similarity matrices and the inputs still grow with B)"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
