"""Label-noise robustness of the contextual loss vs triplet, margin contrastive and InfoNCE (the contextual loss
paper's claim: Liao, Tsiligkaridis & Kulis, ICML 2023, "it degrades least under label noise").

Protocol: frozen backbone features (EfficientNet-Lite0, from the training feature cache) and an MLP head
(1280 → 512 → GELU → 128, enough capacity to fit wrong labels) trained per (loss, noise rate, seed) with P×K batches on the training split, whose labels are corrupted with
*symmetric* noise: each training item's label is replaced, with probability ``rate``, by a uniformly drawn other
training class. Evaluation: Recall@1 (percent, metric-learning sense, leave-one-out) on the clean, class-disjoint test
split after the last epoch (no model selection). Datasets:

* Fashion-MNIST (``train/configs/fashion_mnist_metric.yaml`` at 64 px, but the official train/test files with the same
  10 classes, the classic noisy-label protocol: the 5-vs-5 class-disjoint split leaves too few training classes for
  a trained head to beat the frozen features at all), 600 items/class in each split, P×K = 10×16;
* emoji instance retrieval (``train/configs/emoji_instance.yaml``: held-out identities, 2 vendor views), P×K = 128×2.

Losses: ``contextual`` (metrank defaults, k = K), ``contrastive`` (its margin-contrastive term alone:
ContextualLoss(lam=0, gamma=0), m_pos 0.75 / m_neg 0.6), ``triplet`` (batch-hard, margin 0.2), ``infonce``
(learnable temperature). Writes ``assets/exp_label_noise.md`` and ``assets/exp_label_noise.png``.

    python eval/exp_label_noise.py                       # 3 seeds, both datasets
    python eval/exp_label_noise.py --seeds 0 --datasets fashion_mnist --epochs 2   # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from exp_common import ASSETS, frozen_features, markdown_table, mean_std, save_figure, write_text
from torch import nn
from tqdm import tqdm

from metrank.losses import ContextualLoss, InfoNCELoss, TripletMarginLoss
from metrank.samplers import PKBatchSampler

DATASETS = {
    "fashion_mnist": {
        "config": "train/configs/fashion_mnist_metric.yaml",
        "overrides": ["data.max_per_class=600", "data.kwargs.class_disjoint=false"],
        "p": 10,
        "k": 16,
        "epochs": 10,
        "lr": 1e-3,
    },
    "emoji": {
        "config": "train/configs/emoji_instance.yaml",
        "overrides": [],
        "p": 128,
        "k": 2,
        "epochs": 30,
        "lr": 2e-3,
    },
}
LOSS_NAMES = ("contextual", "contrastive", "triplet", "infonce")
EMBED_DIM, HIDDEN = 128, 512


def build_loss(name: str, k: int) -> nn.Module:
    if name == "contextual":
        return ContextualLoss(k=k)
    if name == "contrastive":
        return ContextualLoss(lam=0.0, gamma=0.0, k=k)
    if name == "triplet":
        return TripletMarginLoss(0.2, miner="batch_hard")
    return InfoNCELoss()


def symmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each label replaced with probability ``rate`` by a uniformly drawn *other* class of ``labels``."""
    classes = np.unique(labels)
    noisy = labels.copy()
    flip = np.flatnonzero(rng.random(len(labels)) < rate)
    for i in flip:
        others = classes[classes != labels[i]]
        noisy[i] = rng.choice(others)
    return noisy


def train_head(x: torch.Tensor, labels: np.ndarray, loss_name: str, spec: dict, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.GELU(), nn.Linear(HIDDEN, EMBED_DIM))
    loss = build_loss(loss_name, spec["k"])
    opt = torch.optim.AdamW(list(head.parameters()) + list(loss.parameters()), lr=spec["lr"], weight_decay=1e-4)
    sampler = PKBatchSampler(labels, p=spec["p"], k=spec["k"], seed=seed, rank=0, world_size=1)
    y = torch.from_numpy(labels)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            index = torch.as_tensor(batch)
            value = loss(F.normalize(head(x[index]), dim=1), y[index])
            opt.zero_grad()
            value.backward()
            opt.step()
    return head


@torch.no_grad()
def recall_at_1(head: nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 (%): exact cosine nearest neighbour other than the query itself has its label."""
    emb = F.normalize(head(x), dim=1)
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    y = torch.from_numpy(labels)
    return 100.0 * float((y[sim.argmax(1)] == y).double().mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=list(LOSS_NAMES))
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    parser.add_argument("--out", default="exp_label_noise", help="file stem under assets/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[tuple[str, str, float], list[float]] = {}
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        _, train, test = frozen_features(spec["config"], spec["overrides"])
        x, clean = train.image.float(), train.labels.numpy()
        x_test, y_test = test.image.float(), test.labels.numpy()
        frozen = recall_at_1(nn.Identity(), x_test, y_test)
        print(
            f"{dataset}: {len(clean)} training items / {len(np.unique(clean))} classes, test {len(y_test)}; "
            f"frozen features R@1 {frozen:.1f}"
        )
        results[(dataset, "frozen features", 0.0)] = [frozen]
        epochs = args.epochs or spec["epochs"]
        runs = [(r, s, name) for r in args.rates for s in args.seeds for name in args.losses]
        for rate, seed, name in tqdm(runs, desc=dataset):
            noisy = symmetric_noise(clean, rate, np.random.default_rng(1000 + seed))
            head = train_head(x, noisy, name, spec, seed, epochs)
            results.setdefault((dataset, name, rate), []).append(recall_at_1(head, x_test, y_test))
    rows = []
    for dataset in args.datasets:
        rows.append(
            [dataset, "frozen features (no training)", mean_std(results[(dataset, "frozen features", 0.0)])]
            + [""] * (len(args.rates) - 1)
            + [""]
        )
        for name in args.losses:
            cells = [mean_std(results[(dataset, name, r)]) for r in args.rates]
            drop = np.mean(results[(dataset, name, args.rates[0])]) - np.mean(results[(dataset, name, args.rates[-1])])
            rows.append([dataset, name, *cells, f"{drop:.1f}"])
    header = [
        "dataset",
        "loss",
        *(f"R@1, {int(100 * r)}% noise" for r in args.rates),
        f"drop {int(100 * args.rates[0])}→{int(100 * args.rates[-1])}%",
    ]
    note = (
        f"Recall@1 (%) on the clean test split, mean ± std over seeds {args.seeds}; MLP head (1280→512→128) on frozen Lite0 "
        f"features, symmetric label noise on the training split. Command: `python eval/exp_label_noise.py "
        f"{' '.join(argv or sys.argv[1:])}` ({time.perf_counter() - start:.0f} s on a shared 2-core CPU).\n\n"
    )
    table = markdown_table(header, rows)
    print(table)
    write_text(
        ASSETS / f"{args.out}.md", "# Label noise: contextual vs triplet, contrastive, InfoNCE\n\n" + note + table
    )
    plot(results, args, ASSETS / f"{args.out}.png")
    return 0


def plot(results, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(5 * len(args.datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], args.datasets):
        for name in args.losses:
            values = [results[(dataset, name, r)] for r in args.rates]
            means = [np.mean(v) for v in values]
            stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar([100 * r for r in args.rates], means, yerr=stds, marker="o", capsize=3, label=name)
        ax.axhline(results[(dataset, "frozen features", 0.0)][0], color="gray", ls="--", label="frozen features")
        ax.set(title=dataset, xlabel="symmetric label noise (%)", ylabel="test R@1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
