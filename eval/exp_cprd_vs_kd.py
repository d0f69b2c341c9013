"""CPRD vs logit distillation vs no distillation, with a teacher clearly stronger than the student (Chen et al.,
CVPR 2024, "How to Make Cross Encoder a Good Teacher for Efficient Image-Text Retrieval?": ranking distillation of
the hard negatives beats logit (KL) distillation).

Protocol, per dataset (emoji image↔name, held-out identities; Tux Paint image↔caption, held-out stamps), on frozen
features (EfficientNet-Lite0 pooled 1280-d, MiniLM mean-pooled 384-d, from the training feature cache):

* **student**: linear image and text heads to a 64-d space on *small-input* features (Lite0 at ``--student-size``
  = 64 px; the teacher sees the 128-px features of the same images, so it is a bigger model in the usual sense), InfoNCE with a learnable temperature, batches of
  ``--batch-size`` pairs with distinct identities, AdamW, ``--epochs`` epochs, last epoch evaluated;
  ``none`` = InfoNCE alone, ``logit_kd`` = InfoNCE + KL(teacher ∥ student) over the student's K = 8 hardest
  in-batch negatives, ``cprd`` = InfoNCE + the CPRD chain over the same K (metrank's ``CPRDLoss`` /
  ``LogitDistillationLoss``, λ ∈ ``--lams`` (1 and 0.1: a sensitivity check, not a selection), paper normalisation, one slot per identity, the chain over the teacher's
  top ``--max-length`` = 4 of the K: the paper's partial ranking, the other 4 only normalise).
* **teachers**, trained once per dataset on the training split only and frozen:
  ``mlp`` — a bigger dual encoder on the 128-px features (2-layer MLP towers, 1024 hidden, 512-d, InfoNCE, 4× the
  student's epochs), cosine scores; ``cross`` — :class:`metrank.losses.teachers.CrossAttentionTeacher` over the two pooled features,
  trained with its image-text matching loss on negatives mined by the ``mlp`` teacher's similarities (ALBEF-style),
  then added to the ``mlp`` teacher's logits (score = s_mlp / τ_mlp + ITM logit: a cross-encoder re-ranker on top of
  the dual encoder, the usual deployment). Each teacher's own test R@1 is reported next to the students'.

R@1 in percent (t2i: a caption's top image has its identity; i2t: an image's top caption describes its identity),
mean ± std over seeds. Writes ``assets/exp_cprd_vs_kd.md`` and ``assets/exp_cprd_vs_kd.png``.

    python eval/exp_cprd_vs_kd.py                         # both datasets, 3 seeds
    python eval/exp_cprd_vs_kd.py --datasets tuxpaint --seeds 0 --epochs 2   # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from exp_common import ASSETS, frozen_features, markdown_table, mean_std, save_figure, write_text
from torch import nn
from tqdm import tqdm

from metrank.losses import CPRDLoss, CrossModalLoss, InfoNCELoss, LogitDistillationLoss
from metrank.losses.teachers import CrossAttentionTeacher
from metrank.samplers import UniqueIdBatchSampler

CONFIGS = {"emoji": "train/configs/emoji_image_text.yaml", "tuxpaint": "train/configs/tuxpaint_image_text.yaml"}
METHODS = ("none", "logit_kd", "cprd")
STUDENT_DIM, K = 64, 8


@dataclass
class Pairs:
    """One caption per row: its image's features, its text features, identity and caption id."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    caption: torch.Tensor

    @classmethod
    def from_features(cls, feats) -> Pairs:
        rows = feats.caption_image
        return cls(feats.image[rows].float(), feats.text.float(), feats.image_ids[rows], torch.arange(len(rows)))


class Towers(nn.Module):
    """Image and text heads into one space (linear, or 2-layer MLPs with ``hidden``)."""

    def __init__(self, image_dim: int, text_dim: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()

        def head(d: int) -> nn.Module:
            if hidden is None:
                return nn.Linear(d, dim)
            return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))

        self.image, self.text = head(image_dim), head(text_dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=1), F.normalize(self.text(text), dim=1)


def batches(pairs: Pairs, batch_size: int, seed: int, epochs: int):
    sampler = UniqueIdBatchSampler(pairs.ids.numpy(), batch_size, seed=seed, rank=0, world_size=1)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            yield torch.as_tensor(batch)


def train_towers(pairs: Pairs, loss: nn.Module, towers: Towers, args, seed: int, epochs: int, distill: bool) -> Towers:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(list(towers.parameters()) + list(loss.parameters()), lr=2e-3, weight_decay=0.5)
    towers.train()
    for index in batches(pairs, args.batch_size, seed, epochs):
        img, txt = towers(pairs.image[index], pairs.text[index])
        extra = {"images": index, "texts": index, "text_ids": pairs.caption[index]} if distill else {}
        value = loss(img, txt, pairs.ids[index], **extra)
        opt.zero_grad()
        value.backward()
        opt.step()
    return towers.eval()


def recall_at_1(scores: torch.Tensor, image_ids: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """t2i / i2t R@1 (%) from a [n_images, n_captions] score matrix; images sharing an identity are interchangeable."""
    caption_ids = image_ids[caption_image]
    t2i = (image_ids[scores.argmax(0)] == caption_ids).double().mean()
    i2t = (caption_ids[scores.argmax(1)] == image_ids).double().mean()
    return {"t2i": 100 * float(t2i), "i2t": 100 * float(i2t)}


@torch.no_grad()
def tower_scores(towers: Towers, feats) -> torch.Tensor:
    img, txt = towers(feats.image.float(), feats.text.float())
    return img @ txt.T


class PairScorer:
    """A frozen teacher over the training pairs: ``teacher(image_rows, text_rows)`` -> scores (rows index Pairs)."""

    def __init__(self, towers: Towers, scale: float, pairs: Pairs, cross: CrossAttentionTeacher | None = None):
        with torch.no_grad():
            self.img, self.txt = towers(pairs.image, pairs.text)
        self.scale, self.cross, self.pairs = scale, cross, pairs

    @torch.no_grad()
    def __call__(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        scores = self.scale * (self.img[image_rows] * self.txt[text_rows]).sum(1)
        if self.cross is not None:
            scores = scores + self.cross(self.pairs.image[image_rows], self.pairs.text[text_rows])
        return scores


@torch.no_grad()
def cross_scores(cross: CrossAttentionTeacher, feats, chunk: int = 64) -> torch.Tensor:
    """[n_images, n_captions] ITM logits of every test pair."""
    image, text = feats.image.float(), feats.text.float()
    rows = []
    for start in range(0, len(image), chunk):
        block = image[start : start + chunk]
        a = block.repeat_interleave(len(text), 0)
        b = text.repeat(len(block), 1)
        rows.append(cross(a, b).view(len(block), len(text)))
    return torch.cat(rows)


def train_teachers(train: Pairs, args, epochs: int):
    """(mlp towers, their logit scale, cross-attention head) trained on the training pairs only."""
    torch.manual_seed(1234)
    towers = Towers(train.image.shape[1], train.text.shape[1], 512, hidden=1024)
    itc = CrossModalLoss(InfoNCELoss())
    train_towers(train, itc, towers, args, 1234, epochs, distill=False)
    scale = float(itc.loss.scale.detach())
    if args.no_cross:
        return towers, scale, None
    cross = CrossAttentionTeacher(train.image.shape[1], train.text.shape[1], width=256, depth=2, heads=4)
    opt = torch.optim.AdamW(cross.parameters(), lr=5e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        t_img, t_txt = towers(train.image, train.text)
    for index in batches(train, args.batch_size, 1234, epochs):
        sim = (t_img[index] @ t_txt[index].T) * scale
        loss = cross.itm_loss(train.image[index], train.text[index], train.ids[index], similarity=sim, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return towers, scale, cross.eval().requires_grad_(False)


def student_loss(
    method: str, teacher: PairScorer | None, lam: float, max_length: int, normalise: str = "all"
) -> nn.Module:
    """KD's teacher softmax temperature is 1: the teacher's scores are already logits (s_mlp / tau_mlp [+ ITM])."""
    if method == "none":
        return CrossModalLoss(InfoNCELoss())
    if method == "logit_kd":
        return LogitDistillationLoss(teacher, k=K, lam=lam, teacher_temperature=1.0)
    return CPRDLoss(teacher, k=K, lam=lam, max_length=max_length, normalise=normalise)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (teachers get 4x)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lams", type=float, nargs="+", default=[1.0, 0.1], help="weights of the distillation term (CPRD and KD)"
    )
    parser.add_argument(
        "--max-length", type=int, default=4, help="CPRD: teacher-ranked prefix kept of the K (the rest only normalise)"
    )
    parser.add_argument("--teachers", nargs="+", default=["mlp"], choices=["mlp", "cross"])
    parser.add_argument("--student-size", type=int, default=64, help="image size of the student's frozen features")
    parser.add_argument(
        "--normalise", nargs="+", default=["all"], choices=["all", "prefix"], help="CPRD chain denominators"
    )
    parser.add_argument("--no-cross", action="store_true", help="skip training the cross-attention teacher")
    parser.add_argument("--out", default="exp_cprd_vs_kd", help="file stem under assets/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    table_rows, results = [], {}
    for dataset in args.datasets:
        _, train_feats, test_feats = frozen_features(CONFIGS[dataset])
        _, student_train_feats, student_test_feats = frozen_features(
            CONFIGS[dataset], [f"model.kwargs.image_size={args.student_size}"]
        )
        train, student_train = Pairs.from_features(train_feats), Pairs.from_features(student_train_feats)
        assert torch.equal(train.ids, student_train.ids), "teacher and student features must list the same pairs"
        ids, cap = test_feats.image_ids, test_feats.caption_image
        print(
            f"{dataset}: {len(train.ids)} training pairs / {len(train.ids.unique())} identities; "
            f"test {len(test_feats.image)} images, {len(cap)} captions"
        )
        towers, scale, cross = train_teachers(train, args, 4 * args.epochs)
        teacher_r1 = {"mlp": recall_at_1(tower_scores(towers, test_feats), ids, cap)}
        if cross is not None:
            teacher_r1["cross"] = recall_at_1(
                scale * tower_scores(towers, test_feats) + cross_scores(cross, test_feats), ids, cap
            )
            teacher_r1["cross-attention head alone"] = recall_at_1(cross_scores(cross, test_feats), ids, cap)
        for name, r in teacher_r1.items():
            label = {"mlp": "teacher: MLP dual encoder", "cross": "teacher: MLP + cross-attention re-ranker"}.get(
                name, f"(teacher part: {name})"
            )
            table_rows.append([dataset, label, f"{r['t2i']:.1f}", f"{r['i2t']:.1f}", "1 run"])
        runs = [("none", None, 0.0, "")]
        for t in args.teachers:
            for lam in args.lams:
                runs.append(("logit_kd", t, lam, ""))
                runs += [("cprd", t, lam, normalise) for normalise in args.normalise]
        for (method, teacher_name, lam, normalise), seed in tqdm(
            [(r, s) for r in runs for s in args.seeds], desc=f"{dataset} students"
        ):
            teacher = None
            if teacher_name is not None:  # cheap to score (precomputed embeddings): no CachedTeacher needed, and
                # its (identity, caption) key would conflate the two vendor images of one emoji identity
                teacher = PairScorer(towers, scale, train, cross if teacher_name == "cross" else None)
            loss = student_loss(method, teacher, lam, args.max_length, normalise or "all")
            torch.manual_seed(seed)  # the student's initialisation depends on its seed only
            student = Towers(student_train.image.shape[1], student_train.text.shape[1], STUDENT_DIM)
            train_towers(student_train, loss, student, args, seed, args.epochs, distill=teacher is not None)
            r = recall_at_1(tower_scores(student, student_test_feats), ids, cap)
            results.setdefault((dataset, method, teacher_name, lam, normalise), []).append(r)
        for (ds, method, teacher_name, lam, normalise), values in results.items():
            if ds != dataset:
                continue
            label = (
                "student: InfoNCE only"
                if method == "none"
                else f"student: {method}{f' ({normalise})' if normalise else ''}, λ = {lam} ({teacher_name} teacher)"
            )
            table_rows.append(
                [
                    dataset,
                    label,
                    mean_std([v["t2i"] for v in values]),
                    mean_std([v["i2t"] for v in values]),
                    f"{len(values)} seeds",
                ]
            )
    header = ["dataset", "model", "t2i R@1 (%)", "i2t R@1 (%)", "runs"]
    note = (
        f"Frozen Lite0 / MiniLM features; student = linear heads to {STUDENT_DIM}-d on {args.student_size}-px features, {args.epochs} epochs, batch "
        f"{args.batch_size}, K = {K} hard negatives, λ ∈ {args.lams}, CPRD prefix ≤ {args.max_length}; teachers trained once on the training split "
        f"({4 * args.epochs} epochs). Command: `python eval/exp_cprd_vs_kd.py {' '.join(argv or sys.argv[1:])}` "
        f"({time.perf_counter() - start:.0f} s on a shared 2-core CPU).\n\n"
    )
    table = markdown_table(header, table_rows)
    print(table)
    write_text(ASSETS / f"{args.out}.md", "# CPRD vs logit distillation vs none\n\n" + note + table)
    plot(results, args, ASSETS / f"{args.out}.png")
    return 0


def plot(results, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(5.5 * len(args.datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], args.datasets):
        keys = [key for key in results if key[0] == dataset]
        labels = ["none" if m == "none" else f"{m}{'/' + z if z else ''}\nλ={lam}" for _, m, t, lam, z in keys]
        for offset, direction in ((-0.2, "t2i"), (0.2, "i2t")):
            means = [np.mean([v[direction] for v in results[key]]) for key in keys]
            stds = [
                np.std([v[direction] for v in results[key]], ddof=1) if len(results[key]) > 1 else 0 for key in keys
            ]
            ax.bar(np.arange(len(keys)) + offset, means, 0.4, yerr=stds, capsize=3, label=f"{direction} R@1")
        ax.set_xticks(np.arange(len(keys)), labels, fontsize=7)
        ax.set(title=dataset, ylabel="test R@1 (%)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
