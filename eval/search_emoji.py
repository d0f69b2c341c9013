"""Emoji search end to end: index the held-out emoji images with a trained checkpoint and report, for the held-out
names, how often the right emoji is among the top 10 images (also for the untrained model, as a baseline).

The test identities of ``metrank.data`` "emoji" (class-disjoint from training) are indexed through
``Retriever.add(images=...)``; each held-out name queries ``modality="image"`` and hits when an image of its identity
(any vendor) is in the top 10. The default checkpoint is ``<output.dir>/model_best.pt`` of
``train/configs/emoji_image_text.yaml``; the baseline is ``create_model`` with that config's model (untrained heads).

    python eval/search_emoji.py                                   # after: metrank train train/configs/emoji_image_text.yaml
    python eval/search_emoji.py --checkpoint runs/x/model_best.pt --hubness qb_norm
    python eval/search_emoji.py --out emoji_index --screenshot assets/search_page.png --query "cat"
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml

from metrank.data import create_dataset
from metrank.metrics import format_table
from metrank.search import Retriever

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "configs", "emoji_image_text.yaml")


def build(model, vendors: list[str], batch_size: int) -> Retriever:
    data = create_dataset("emoji", split="test")
    keep = [i for i, v in enumerate(data.image_views) if v in vendors]
    names = {int(data.caption_image[c]): data.captions[c] for c in range(len(data.captions))}
    paths = [data.images[i] for i in keep]
    retriever = Retriever.create(model=model, media_roots=[os.path.commonpath(paths)])
    retriever.add(
        images=paths,
        batch_size=batch_size,
        metadata=[
            {"name": names[i], "identity": int(data.image_labels[i]), "vendor": str(data.image_views[i])} for i in keep
        ],
    )
    return retriever


def held_out_queries() -> tuple:
    data = create_dataset("emoji", split="test")
    first = {}
    for c, image in enumerate(data.caption_image.tolist()):
        first.setdefault(int(data.image_labels[image]), data.captions[c])
    labels = np.array(sorted(first))
    return [first[i] for i in labels], labels


def top10_rate(retriever: Retriever, names: list[str], labels: np.ndarray, hubness: bool = True) -> dict[str, float]:
    queries = retriever.embed_texts(names)
    rows = retriever.search_vectors(queries, k=10, modality="image", hubness=hubness)
    out = {}
    for k in (1, 5, 10):
        out[f"top{k}"] = float(
            np.mean([any(h.metadata["identity"] == q for h in row[:k]) for row, q in zip(rows, labels)])
        )
    return out


def screenshot(retriever: Retriever, query: str, path: str) -> None:
    """Serve ``retriever`` on loopback and capture the search page for ``query`` with headless Chromium."""
    from urllib.parse import quote_plus

    from metrank.search.server import BackgroundServer, create_app

    with BackgroundServer(create_app(retriever)) as url, tempfile.TemporaryDirectory() as profile:
        target = os.path.abspath(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp.png"
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--window-size=1100,760",
                f"--screenshot={tmp}",
                f"{url}/?q={quote_plus(query)}&modality=image&k=12",
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        os.replace(tmp, target)
    print(f"screenshot of the search page for {query!r} -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="training config giving the model and output dir")
    parser.add_argument("--checkpoint", help="trained model (default: <output.dir>/model_best.pt of --config)")
    parser.add_argument("--vendors", default="google,twitter", help="which emoji designs to index")
    parser.add_argument(
        "--hubness", choices=["qb_norm", "nnn"], help="also report with this correction (bank: training-split names)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained-model baseline")
    parser.add_argument("--out", help="save the trained model's index here (serve it with `metrank serve`)")
    parser.add_argument("--screenshot", help="write a PNG of the search page (headless chromium) here")
    parser.add_argument("--query", default="cat", help="query for --screenshot")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    checkpoint = args.checkpoint or os.path.normpath(
        os.path.join(
            os.path.dirname(os.path.abspath(args.config)), "..", "..", config["output"]["dir"], "model_best.pt"
        )
    )
    vendors = args.vendors.split(",")
    names, labels = held_out_queries()
    print(f"{len(labels)} held-out identities; indexing their {'+'.join(vendors)} images")
    rows, row_names = [], []
    if not args.no_baseline:
        from metrank.encoders import create_model

        untrained = build(
            create_model(config["model"]["name"], **config["model"].get("kwargs", {})), vendors, args.batch_size
        )
        rows.append(top10_rate(untrained, names, labels))
        row_names.append("untrained model (baseline)")
    if not os.path.isfile(checkpoint):
        print(format_table(rows, names=row_names) if rows else "")
        print(
            f"no trained checkpoint at {checkpoint}: train first (metrank train {os.path.relpath(args.config)}) "
            "or pass --checkpoint",
            file=sys.stderr,
        )
        return 2
    trained = build(checkpoint, vendors, args.batch_size)
    rows.append(top10_rate(trained, names, labels))
    row_names.append(f"trained ({os.path.relpath(checkpoint)})")
    if args.hubness:
        train = create_dataset("emoji", split="train")
        trained.set_hubness(args.hubness, bank=trained.embed_texts(sorted(set(train.captions))), modality="image")
        rows.append(top10_rate(trained, names, labels))
        row_names.append(f"trained + {args.hubness}")
    print(format_table(rows, names=row_names))
    if args.out:
        print(f"index saved to {trained.save(args.out)}")
    if args.screenshot:
        screenshot(trained, args.query, args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
