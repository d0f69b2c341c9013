"""Train every emoji/Tux Paint experiment of the results table, compare with the frozen baselines, write the table.

Each experiment is one ``metrank train`` run (config + overrides, printed in the table as the exact command), run
here in-process one after the other; the frozen baselines come from ``eval/frozen_baselines.py`` on the same
cached features. Outputs: ``assets/results_emoji.md`` (table + commands + wall times) and
``assets/loss_comparison.png`` (held-out t2i R@1 and RSUM per epoch of every image-text loss, frozen baseline
dashed).

    python eval/train_results.py                      # everything (about 15-30 min on 2 CPU cores)
    python eval/train_results.py --only infonce triplet --epochs 2 --out /tmp/results   # quick check
    python eval/train_results.py --suite modes --runs runs/modes --curves assets/training_curves.png
    python eval/train_results.py --suite losses --runs runs/losses
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrank.metrics import format_table
from metrank.training import Trainer, load_config
from metrank.training.baselines import eval_views, frozen_baselines, ridge_transfer, view_metrics
from metrank.training.trainer import embed_rows

REPO = Path(__file__).resolve().parents[1]

EMOJI = "train/configs/emoji_image_text.yaml"
EMOJI_LAST_N = "train/configs/emoji_last_n.yaml"
# (name, config, overrides): the image-text losses share one budget (epochs, batch, lr schedule, heads)
EXPERIMENTS = [
    ("infonce", EMOJI, []),
    ("hard_negative", EMOJI, ["loss.name=hard_negative", "loss.kwargs={margin: 0.2, warmup_steps: 100}"]),
    ("triplet", EMOJI, ["loss.name=triplet", "loss.kwargs={margin: 0.2, distance: cosine}"]),
    ("contextual", EMOJI, ["loss.name=contextual", "loss.kwargs={k: 4}", "sampler.name=pk", "sampler.kwargs={k: 2}"]),
    ("last_n (1+1 blocks, phrases)", EMOJI_LAST_N, []),
    ("emoji_instance", "train/configs/emoji_instance.yaml", []),
    ("tuxpaint", "train/configs/tuxpaint_image_text.yaml", []),
]
# Issue 9 suites, reported from finished run directories (``--suite NAME --runs DIR``; a missing run is trained first).
# modes: one budget for every row (same data, InfoNCE, 64 px, batch 128, cosine schedule, 2 epochs: what LoRA and full
# fine-tuning of both towers afford on the shared 2-core CPU); only what trains differs, with the backbone learning
# rate usual for the mode (LoRA 5e-4, full 5e-5, last_n 1e-4).
EMOJI_MODES = "train/configs/emoji_modes.yaml"
PHRASES = "data.train_kwargs={caption_mode: phrases}"
MODE_EPOCHS = "train.epochs=2"
SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    "modes": [
        ("heads", EMOJI_MODES, ["model.image.mode=heads", "model.text.mode=heads", MODE_EPOCHS]),
        ("last_n", EMOJI_MODES, ["model.image.mode=last_n", "model.text.mode=last_n", MODE_EPOCHS]),
        (
            "lora",
            EMOJI_MODES,
            ["model.image.mode=lora", "model.text.mode=lora", "model.image.lr=5e-4", "model.text.lr=5e-4", MODE_EPOCHS],
        ),
        (
            "full",
            EMOJI_MODES,
            ["model.image.mode=full", "model.text.mode=full", "model.image.lr=5e-5", "model.text.lr=5e-5", MODE_EPOCHS],
        ),
    ],
    # losses in the best mode (heads, the main config: 128 px, batch 256, 30 epochs)
    "losses": [
        *[(name, config, overrides) for name, config, overrides in EXPERIMENTS[:4]],
        ("cprd", EMOJI, ["loss.name=cprd"]),
        ("cross_modal_quadruplet", EMOJI, ["loss.name=cross_modal_quadruplet"]),
        ("cross_modal_quadruplet lam=0.1", EMOJI, ["loss.name=cross_modal_quadruplet", "loss.kwargs={lam: 0.1}"]),
    ],
    # regularisers against heads-only memorisation: caption variety (the name and each short name as captions, one
    # or two drawn per image per epoch), dropout on the cached features; in last_n / lora also layer-wise lr decay
    # and (lora) augmentation: random resized crop + colour jitter, no flip (emoji are not mirror-invariant); these
    # at the modes-table budget (64 px, 2 epochs)
    "regularise": [
        ("heads, phrases, 1 per image", EMOJI, [PHRASES, "data.captions_per_image=1"]),
        ("heads, phrases, 2 per image", EMOJI, [PHRASES, "data.captions_per_image=2"]),
        ("heads, feature dropout 0.3", EMOJI, ["train.feature_dropout=0.3"]),
        (
            "last_n 2+2, phrases, 1 per image, layer decay 0.7",
            EMOJI_MODES,
            [
                "model.image.mode=last_n",
                "model.text.mode=last_n",
                "model.image.blocks=2",
                "model.text.blocks=2",
                PHRASES,
                "data.captions_per_image=1",
                "optim.layer_decay=0.7",
                MODE_EPOCHS,
            ],
        ),
        (
            "lora, augment, phrases, 1 per image, layer decay 0.7",
            EMOJI_MODES,
            [
                "model.image.mode=lora",
                "model.text.mode=lora",
                "model.image.lr=5e-4",
                "model.text.lr=5e-4",
                "data.augment=true",
                PHRASES,
                "data.captions_per_image=1",
                "optim.layer_decay=0.7",
                MODE_EPOCHS,
            ],
        ),
    ],
}
BASELINES = [
    ("emoji frozen ridge", EMOJI),
    ("emoji_instance frozen", "train/configs/emoji_instance.yaml"),
    ("tuxpaint frozen ridge", "train/configs/tuxpaint_image_text.yaml"),
]
IMAGE_TEXT_COLUMNS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "rsum")


def command(config: str, overrides: Sequence[str]) -> str:
    quoted = [f"'{o}'" if any(c in o for c in " {}[],") else o for o in overrides]
    return " ".join(["metrank train", config, *quoted])


def run_baseline(config: str) -> dict[str, dict[str, float]]:
    return frozen_baselines(load_config(REPO / config))


def zero_shot(model_path: Path, source: str, target: str, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of the zero-shot transfer table: the trained model (``model_path``, trained on ``source``) and the ridge
    map fitted on ``source``'s frozen features, both evaluated on ``target``'s test split (never trained on)."""
    from metrank.encoders import load_checkpoint
    from metrank.metrics import image_text_metrics
    from metrank.training.feature_sets import open_dataset, select_rows

    cfg = load_config(REPO / target, overrides)
    sel = select_rows(cfg, open_dataset(cfg, cfg.data.eval_split), "test")
    model = load_checkpoint(model_path)
    images = model.embed_images([sel.load_image(i) for i in range(len(sel.image_index))], progress=False)
    texts = model.embed_texts(sel.captions or [], progress=False)
    trained = image_text_metrics(images, texts, sel.caption_image, image_labels=sel.image_ids, progress=False)
    ridge = ridge_transfer(load_config(REPO / source, overrides), cfg)
    return [
        {"name": f"{model_path.parent.name} (trained on {Path(source).stem})", "metrics": trained},
        {"name": f"frozen ridge fitted on {Path(source).stem}", "metrics": ridge},
    ]


def fmt(value: Any) -> str:
    return (
        ""
        if value is None
        else (
            f"{value:.3f}"
            if isinstance(value, float) and value < 1.0
            else f"{value:.1f}"
            if isinstance(value, float)
            else str(value)
        )
    )


def write_markdown(path: Path, runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    lines = [
        "# Training results (CPU)",
        "",
        "Regenerate: `python eval/train_results.py` (rows below list each run's exact command). Image-text",
        "recalls are percentages on held-out identities (emoji: 30% of the 1,911 identities, class-disjoint;",
        "a name hits on either vendor's drawing); instance R@1 is a fraction (query = one vendor's image, the",
        "relevant item = the other vendor's image of the same emoji, leave-one-out over the held-out split).",
        "Wall times include model building and (cached after the first run) feature extraction on a shared",
        "2-core machine.",
        "",
        "## Image <-> text",
        "",
        "| run | " + " | ".join(IMAGE_TEXT_COLUMNS) + " | best epoch | wall s | command |",
        "|---" * (len(IMAGE_TEXT_COLUMNS) + 4) + "|",
    ]
    for row in baselines + runs:
        if "rsum" not in row["metrics"]:
            continue
        cells = [fmt(row["metrics"].get(k)) for k in IMAGE_TEXT_COLUMNS]
        lines.append(
            f"| {row['name']} | "
            + " | ".join(cells)
            + f" | {row.get('best_epoch', '')} | {fmt(row['wall_s'])} | `{row['command']}` |"
        )
    lines += [
        "",
        "## Instance retrieval (emoji, 2 views)",
        "",
        "| run | R@1 | R@2 | R@4 | R@8 | MAP@R | wall s | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in baselines + runs:
        if "R@1" not in row["metrics"]:
            continue
        cells = [fmt(row["metrics"].get(k)) for k in ("R@1", "R@2", "R@4", "R@8", "MAP@R")]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {fmt(row['wall_s'])} | `{row['command']}` |")
    lines += [
        "",
        "## Notes",
        "",
        "- Metrics are the test split's, for `model_best.pt`: the epoch (`best epoch`) of the best RSUM on the",
        "  validation split (10% of the training identities); the test split is used for nothing else. The",
        "  frozen baselines use the same cached features and metric code.",
        "- The ridge baseline (centred features, lambda picked on 20% of the training identities) is",
        "  stronger than SPEC's 0.156 t2i R@1; compare the trained rows with it." + _delta(runs, baselines),
        "- Instance retrieval: the `twitter -> google` rows are SPEC's protocol (frozen 0.47 there); the",
        "  leave-one-out rows are what `metrank train` reports per epoch (the other twitter images of the",
        "  held-out split are distractors too).",
        "- The main job from an empty feature cache (3,822 images at 128 px + 3,822 captions, then 30",
        "  epochs): `metrank train train/configs/emoji_image_text.yaml output.cache_dir=/tmp/coldcache`,",
        "  measured 8 min 26 s wall on the shared 2-core machine (load average 3-7 from other jobs).",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _delta(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> str:
    """e.g. ' InfoNCE vs ridge on emoji: +4.2 t2i R@1, +11.0 RSUM.' (empty when either row is missing)."""
    run = next((r for r in runs if r["name"] == "infonce"), None)
    base = next((b for b in baselines if b["config"] == EMOJI), None)
    if run is None or base is None:
        return ""
    d_r1 = run["metrics"]["t2i_R@1"] - base["metrics"]["t2i_R@1"]
    d_rsum = run["metrics"]["rsum"] - base["metrics"]["rsum"]
    return f" InfoNCE vs ridge on emoji: {d_r1:+.1f} t2i R@1, {d_rsum:+.1f} RSUM."


def plot(path: Path, runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    emoji_runs = [r for r in runs if r["config"] in (EMOJI, EMOJI_LAST_N) and "rsum" in r["metrics"]]
    for key, ax in zip(("t2i_R@1", "rsum"), axes):
        for run in emoji_runs:
            points = [(rec["epoch"], rec[key]) for rec in run["records"] if key in rec]
            ax.plot(*zip(*points), marker=".", label=run["name"])
        for base in baselines:
            if base["config"] == EMOJI:
                ax.axhline(base["metrics"][key], color="gray", linestyle="--", label=base["name"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {key} (%)")
        ax.legend(fontsize=8)
    fig.suptitle("emoji name <-> image, validation identities per epoch (frozen ridge on the test split, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_dir_result(name: str, config: str, overrides: Sequence[str], runs: Path, extra: Sequence[str]) -> dict:
    """The results of one suite run: read from ``runs/<name>`` when it finished there, else trained first."""
    from metrank.encoders import read_checkpoint

    out = runs / name
    if not (out / "model_best.pt").is_file():
        Trainer(load_config(REPO / config, [*overrides, *extra, f"output.dir={out}"])).fit()
    best = read_checkpoint(out / "model_best.pt")["extra"]
    final = read_checkpoint(out / "model_final.pt")["extra"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch_s"] for r in records if r.get("epoch_s") is not None]
    return {
        "name": name,
        "best": best["test_metrics"],
        "final": final["test_metrics"],
        "best_epoch": best["train_best"]["epoch"],
        "epochs": max(r["epoch"] for r in records),
        "epoch_s": sum(epochs) / max(len(epochs), 1),
        "loss": records[-1].get("loss"),
        "records": records,
        "command": command(config, overrides),
    }


def suite_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: a ``best`` (validation-selected) and a ``final`` (last epoch) row per run, test-split recalls."""
    head = ["run", "model", *IMAGE_TEXT_COLUMNS, "best epoch (val)", "s/epoch", "final train loss", "command"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        for which in ("best", "final"):
            cells = [fmt(float(row[which][k])) for k in IMAGE_TEXT_COLUMNS]
            tail = (
                [f"{row['best_epoch']} / {row['epochs']}", f"{row['epoch_s']:.1f}", f"{row['loss']:.3f}"]
                if which == "best"
                else ["", "", ""]
            )
            command_cell = f"`{row['command']}`" if which == "best" else "same run, `model_final.pt`"
            lines.append("| " + " | ".join([row["name"], which, *cells, *tail, command_cell]) + " |")
    return "\n".join(lines)


def plot_train_vs_heldout(path: Path, rows: Sequence[dict[str, Any]], key: str = "t2i_R@1") -> None:
    """One panel per run: ``key`` per epoch on the training probe (training identities) and the validation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        for column, label, style in ((f"train_{key}", "train identities", "--"), (key, "validation (held out)", "-")):
            points = [(r["epoch"], r[column]) for r in row["records"] if column in r]
            if points:
                ax.plot(*zip(*points), style, marker=".", label=label)
        ax.axhline(float(row["final"][key]), color="gray", linestyle=":", label="test, final")
        ax.set_title(row["name"])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(f"{key} (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"emoji {key}: training identities vs held-out identities per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_suite(args: argparse.Namespace) -> int:
    runs = Path(args.runs)
    rows = []
    for name, config, overrides in SUITES[args.suite]:
        if args.only and name not in args.only:
            continue
        if args.epochs:  # another budget: every run of the suite at --epochs
            overrides = [o for o in overrides if not o.startswith("train.epochs=")] + [f"train.epochs={args.epochs}"]
        rows.append(run_dir_result(name, config, overrides, runs, args.set))
    print(suite_table(rows))
    if args.curves:
        plot_train_vs_heldout(Path(args.curves), rows)
        print(f"wrote {args.curves}")
    return 0


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="experiment names to run (default: all)")
    parser.add_argument("--epochs", type=int, help="override train.epochs of every run (quick checks)")
    parser.add_argument("--out", default=str(REPO / "assets"), help="where the table and plot go")
    parser.add_argument("--runs", default="runs/results", help="output.dir parent of the training runs")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument(
        "--zero-shot",
        metavar="MODEL",
        help="only the transfer check: MODEL (an emoji-trained model_best.pt) and the emoji ridge map, zero-shot on "
        "the Tux Paint test split; writes <out>/zero_shot_tuxpaint.md",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for --zero-shot and --suite runs"
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        help="only this issue-9 suite: report (training what is missing) the runs under --runs as a markdown table",
    )
    parser.add_argument("--curves", help="with --suite: draw train vs held-out t2i R@1 per epoch to this PNG")
    args = parser.parse_args(argv)
    if args.suite:
        return run_suite(args)
    if args.zero_shot:
        rows = zero_shot(Path(args.zero_shot), EMOJI, "train/configs/tuxpaint_image_text.yaml", args.set)
        table = format_table([r["metrics"] for r in rows], names=[r["name"] for r in rows])
        print(table)
        out = Path(args.out) / "zero_shot_tuxpaint.md"
        out.write_text(
            "# Zero-shot transfer: emoji-trained -> Tux Paint test split (recalls in percent)\n\n"
            f"`python eval/train_results.py --zero-shot {args.zero_shot}`\n\n```\n{table}\n```\n"
        )
        print(f"wrote {out}")
        return 0

    baselines: list[dict[str, Any]] = []
    if not args.no_baselines:
        for name, config in BASELINES:
            start = time.perf_counter()
            for row_name, metrics in run_baseline(config).items():
                baselines.append(
                    {
                        "name": f"{name} ({row_name.replace('frozen ', '')})",
                        "config": config,
                        "metrics": metrics,
                        "wall_s": time.perf_counter() - start,
                        "command": f"python eval/frozen_baselines.py {config}",
                    }
                )
    runs: list[dict[str, Any]] = []
    for name, config, overrides in EXPERIMENTS:
        if args.only and name not in args.only:
            continue
        overrides = (
            overrides + [f"output.dir={args.runs}/{name}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
        )
        start = time.perf_counter()
        cfg = load_config(REPO / config, overrides)
        trainer = Trainer(cfg)
        result = trainer.fit()
        wall = time.perf_counter() - start
        rows = {name: result.metrics}
        if cfg.task == "metric":  # also the cross-view protocol of the frozen baseline, on the final model
            trainer.module.eval()
            emb = embed_rows(trainer.module.embed_images, trainer.test_rows.image, trainer.device, 256).numpy()
            views = eval_views(trainer.test_sel.dataset, cfg)
            rows = {
                k.replace("trained, leave-one-out", name).replace("trained,", f"{name},"): v
                for k, v in view_metrics(emb, trainer.test_sel.image_ids, views, cfg.eval.ks, "trained").items()
            }
        for row_name, metrics in rows.items():
            runs.append(
                {
                    "name": row_name,
                    "config": config,
                    "metrics": metrics,
                    "records": result.records,
                    "best_epoch": result.best["epoch"],
                    "wall_s": wall,
                    "command": command(config, overrides),
                }
            )
        shown = {k: round(result.metrics[k], 3) for k in (*IMAGE_TEXT_COLUMNS, "R@1") if k in result.metrics}
        print(f"{name}: {shown} in {wall:.0f} s", flush=True)
    out = Path(args.out)
    write_markdown(out / "results_emoji.md", runs, baselines)
    plot(out / "loss_comparison.png", runs, baselines)
    print(f"wrote {out / 'results_emoji.md'} and {out / 'loss_comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
