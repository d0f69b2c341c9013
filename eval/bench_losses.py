"""Forward+backward time and peak memory of every metrank loss vs pytorch-metric-learning's closest equivalent.

    python eval/bench_losses.py                      # B in {128, 512, 1024}, d = 512
    python eval/bench_losses.py --batch-sizes 64 128 --dim 64 --repeats 2   # quick check

Time: median wall time of ``--repeats`` forward+backward passes after one warm-up pass. Memory: peak resident set
size added during one forward+backward (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), with
glibc told to serve every allocation above 64 KiB by mmap so freed tensors go back to the OS between measurements.
PML baselines whose own B³ or (pairs × negative pairs) buffers would exceed ``--max-pml-gib`` are reported as
skipped with the projected size. Unimodal losses use B/4 classes × 4 samples; cross-modal ones a paired image/text
batch with ids = arange(B). SigLIP's alternative is open_clip's ``SigLipLoss`` (same value); the XBM row runs
batch-hard triplets against a full 4·B-row memory, its alternative PML's ``CrossBatchMemory`` of the same size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from metrank.losses import (
    CrossModalLoss,
    CrossModalQuadrupletLoss,
    HardNegativeLoss,
    HardNegativeNCELoss,
    InfoNCELoss,
    MemoryBankLoss,
    MultipleNegativesRankingLoss,
    QuadrupletLoss,
    SigLipLoss,
    TripletAlignmentLoss,
    TripletMarginLoss,
)

Step = Callable[[], torch.Tensor]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure(step: Step, leaves: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB added) of ``step().backward()``."""

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        step().backward()

    run()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS:")
    run()
    peak = (_status_bytes("VmHWM:") - base) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()


def cases(b: int, d: int) -> list[tuple[str, Step, Step | None, float, list[torch.Tensor]]]:
    """(name, ours, PML equivalent or None, PML projected GiB, leaves)."""
    x, labels = unit(b, d, 0), torch.arange(b // 4).repeat_interleave(4)[:b]
    image, text, ids = unit(b, d, 1), unit(b, d, 2), torch.arange(b)
    cube_gib = b**3 / 2**30  # PML builds a B×B×B uint8 triplet mask (plus index tensors)
    positives, negatives = 3 * b, b * (b - 4)
    ntxent_gib = 3 * 4 * positives * negatives / 2**30  # PML NTXent: positives × negative-pairs float matrices
    semi = TripletMarginLoss(0.2, miner="semi_hard")
    batch_hard = TripletMarginLoss(0.2, miner="batch_hard")
    pml_triplet = pml_losses.TripletMarginLoss(margin=0.2)
    pml_semi, pml_hard = pml_miners.TripletMarginMiner(0.2, "semihard"), pml_miners.BatchHardMiner()
    infonce, ntxent = InfoNCELoss(0.07, learnable=False), pml_losses.NTXentLoss(0.07)
    clip = CrossModalLoss(InfoNCELoss())
    mnr, vsepp, tal = (
        CrossModalLoss(MultipleNegativesRankingLoss()),
        CrossModalLoss(HardNegativeLoss()),
        CrossModalLoss(TripletAlignmentLoss()),
    )
    quad, cdmlmr = QuadrupletLoss(), CrossModalQuadrupletLoss()
    siglip, open_clip_siglip = SigLipLoss(), OpenClipSigLipLoss()
    hn_nce = CrossModalLoss(HardNegativeNCELoss())
    xbm = MemoryBankLoss(TripletMarginLoss(0.2, miner="batch_hard"), memory_size=4 * b)
    pml_xbm = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(margin=0.2), d, memory_size=4 * b, miner=pml_miners.BatchHardMiner()
    )
    for _ in range(4):  # fill both memories
        xbm(x.detach(), labels)
        pml_xbm(x.detach(), labels)
    cdmlmr_labels = torch.where(torch.arange(b) % 2 == 0, torch.arange(b) % (b // 4), -1)
    return [
        (
            "triplet+semi_hard",
            lambda: semi(x, labels),
            lambda: pml_triplet(x, labels, pml_semi(x, labels)),
            cube_gib,
            [x],
        ),
        (
            "triplet+batch_hard",
            lambda: batch_hard(x, labels),
            lambda: pml_triplet(x, labels, pml_hard(x, labels)),
            0.0,
            [x],
        ),
        ("infonce (fixed τ)", lambda: infonce(x, labels), lambda: ntxent(x, labels), ntxent_gib, [x]),
        ("clip (img<->txt)", lambda: clip(image, text, ids), None, 0.0, [image, text]),
        ("mnr (img<->txt)", lambda: mnr(image, text, ids), None, 0.0, [image, text]),
        ("vse++ (img<->txt)", lambda: vsepp(image, text, ids), None, 0.0, [image, text]),
        ("tal (img<->txt)", lambda: tal(image, text, ids), None, 0.0, [image, text]),
        ("quadruplet", lambda: quad(x, labels), None, 0.0, [x]),
        ("cdmlmr (img<->txt)", lambda: cdmlmr(image, text, cdmlmr_labels), None, 0.0, [image, text]),
        (
            "siglip (vs open_clip)",
            lambda: siglip(image, text, ids),
            lambda: open_clip_siglip(image, text, siglip.scale, siglip.logit_bias),
            0.0,
            [image, text],
        ),
        ("hn_nce (img<->txt)", lambda: hn_nce(image, text, ids), None, 0.0, [image, text]),
        ("xbm triplet+batch_hard", lambda: xbm(x, labels), lambda: pml_xbm(x, labels), 0.0, [x]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--max-pml-gib", type=float, default=3.0, help="skip PML baselines projected to allocate more than this"
    )
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the loss names to run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(b < 8 or b % 4 for b in args.batch_sizes):
        raise ValueError("batch sizes must be multiples of 4 and >= 8 (4 samples per class)")

    header = f"{'loss':<24} {'B':>5} {'ours ms':>9} {'PML ms':>9} {'time ratio':>10} {'ours MiB':>9} {'PML MiB':>9}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.dim}")
    print(header)
    print("-" * len(header))
    for b in args.batch_sizes:
        for name, ours, theirs, pml_gib, leaves in cases(b, args.dim):
            if args.only and not any(s in name for s in args.only):
                continue
            t_ours, m_ours = measure(ours, leaves, args.repeats)
            pml_ms = pml_mib = ratio = "-"
            if theirs is not None and pml_gib > args.max_pml_gib:
                pml_ms, pml_mib, ratio = "skip", f">{pml_gib:.0f}GiB", "-"
            elif theirs is not None:
                t_pml, m_pml = measure(theirs, leaves, args.repeats)
                pml_ms, pml_mib, ratio = f"{1e3 * t_pml:.1f}", f"{m_pml:.0f}", f"{t_ours / t_pml:.2f}"
            print(
                f"{name:<24} {b:>5} {1e3 * t_ours:>9.1f} {pml_ms:>9} {ratio:>10} {m_ours:>9.0f} {pml_mib:>9}",
                flush=True,
            )
    print("time ratio = ours / PML (< 1: ours faster); MiB = peak RSS added by one forward+backward")
    return 0


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # make freed tensors leave the RSS, so peaks are per-measurement
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    sys.exit(main())
