"""Emoji from several designers (npm ``emoji-datasource-<vendor>@16.0.0``): instance retrieval across vendors and
image <-> name retrieval, fully offline once fetched.

Layout (made by ``fetch_emoji``): ``<root>/emoji/emoji-datasource-<vendor>/package/emoji.json`` and
``.../package/img/<vendor>/64/<image>`` (64x64 RGBA PNG). An identity is one ``emoji.json`` entry (its ``unified``
code) with an image in every requested vendor: 1,911 for google + twitter. Split: a seeded random 30% of the
identities is the test set (class-disjoint). Each image's caption is the lower-cased ``name`` followed by its
``short_names`` (``_``/``-`` as spaces) when they add words, e.g. ``"person raising both hands in celebration,
raised hands"``; ``image_views`` is the vendor, ``image_labels`` the identity (contiguous within the split).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from metrank.data.base import DATASETS, ImageTextDataset
from metrank.data.root import data_root
from metrank.data.splits import check_split, held_out_classes, in_split
from metrank.errors import InputError, MissingFileError

EMOJI_VERSION = "16.0.0"
EMOJI_VENDORS = ("google", "twitter")


def emoji_package_dir(root: Path, vendor: str) -> Path:
    return root / "emoji" / f"emoji-datasource-{vendor}" / "package"


def fetch_emoji(root: str | None = None, vendors: Sequence[str] = EMOJI_VENDORS, force: bool = False) -> Path:
    """Download the emoji packages with ``npm pack`` and unpack ``emoji.json`` and the 64 px images under
    ``<root>/emoji/``; returns that directory. Skips vendors already present unless ``force``."""
    base = data_root(root) / "emoji"
    base.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        raise MissingFileError(
            "the emoji data set is fetched with npm (Node.js); install it (apt-get install npm) "
            "or copy an unpacked emoji-datasource-<vendor> package into " + str(base)
        )
    for vendor in vendors:
        target = emoji_package_dir(data_root(root), vendor).parent
        if target.is_dir() and not force:
            continue
        spec = f"emoji-datasource-{vendor}@{EMOJI_VERSION}"
        with tempfile.TemporaryDirectory(dir=base, prefix=f".fetch-{vendor}-") as tmp:
            result = subprocess.run(
                ["npm", "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True, text=True
            )
            tarballs = list(Path(tmp).glob("*.tgz"))
            if result.returncode != 0 or not tarballs:
                raise MissingFileError(f"npm pack {spec} failed: {result.stderr.strip()[-500:]}")
            unpacked = Path(tmp) / "unpacked"
            wanted = ("package/emoji.json", "package/LICENSE", "package/package.json", f"package/img/{vendor}/64/")
            with tarfile.open(tarballs[0]) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
                tar.extractall(unpacked, members=members, filter="data")
            if target.exists():
                shutil.rmtree(target)
            os.replace(unpacked, target)
    return base


def emoji_phrases(entry: dict) -> list[str]:
    """``name`` lower-cased, then the short names that add words (``_``/``-`` read as spaces)."""
    name = entry["name"].lower()
    extra = []
    for short in entry.get("short_names") or []:
        text = short.replace("_", " ").replace("-", " ").lower()
        if text != name and text not in extra:
            extra.append(text)
    return [name] + extra


def emoji_caption(entry: dict) -> str:
    """The phrases of :func:`emoji_phrases` joined by commas, e.g. "person raising both hands in celebration,
    raised hands"."""
    return ", ".join(emoji_phrases(entry))


CAPTION_MODES = ("joined", "phrases")


@DATASETS.register("emoji")
def load_emoji(
    root: str | None = None,
    split: str = "train",
    vendors: Sequence[str] = EMOJI_VENDORS,
    test_fraction: float = 0.3,
    seed: int = 0,
    download: bool = False,
    caption_mode: str = "joined",
    **dataset_kw,
) -> ImageTextDataset:
    """The emoji ``ImageTextDataset`` (one image and one caption per identity and vendor); see module docstring.

    ``download=True`` runs ``fetch_emoji`` when the data is missing. ``dataset_kw`` go to ``ImageTextDataset``
    (``transform``, ``on_error``, ...). ``categories`` / ``subcategories`` give each identity label's emoji
    category (10) and subcategory (99), e.g. for hierarchical sampling. ``caption_mode="phrases"`` gives each image
    several captions, one per phrase (the name, then each short name that adds words) instead of one joined caption:
    more caption variety for training (``data.train_kwargs={caption_mode: phrases}``).
    """
    check_split(split)
    if caption_mode not in CAPTION_MODES:
        raise InputError(f"caption_mode must be one of {', '.join(CAPTION_MODES)}, got {caption_mode!r}")
    vendors = list(vendors)
    if not vendors or any(v not in ("google", "twitter", "apple", "facebook") for v in vendors):
        raise InputError(f"vendors must be a non-empty subset of google, twitter, apple, facebook; got {vendors}")
    base = data_root(root)
    missing = [v for v in vendors if not (emoji_package_dir(base, v) / "emoji.json").is_file()]
    if missing and download:
        fetch_emoji(root, missing)
    elif missing:
        raise MissingFileError(
            f"emoji data for {', '.join(missing)} not found under {base / 'emoji'}; run "
            "`metrank data fetch emoji` (or pass download=True)"
        )
    entries = json.loads((emoji_package_dir(base, vendors[0]) / "emoji.json").read_text(encoding="utf-8"))
    entries = sorted((e for e in entries if all(e.get(f"has_img_{v}") for v in vendors)), key=lambda e: e["sort_order"])
    test = held_out_classes([e["unified"] for e in entries], test_fraction, seed)
    chosen = [e for e in entries if in_split(e["unified"] in test, split)]
    images, labels, views, captions, caption_image = [], [], [], [], []
    for label, entry in enumerate(chosen):
        texts = [emoji_caption(entry)] if caption_mode == "joined" else emoji_phrases(entry)
        for vendor in vendors:
            images.append(str(emoji_package_dir(base, vendor) / "img" / vendor / "64" / entry["image"]))
            labels.append(label)
            views.append(vendor)
            captions += texts
            caption_image += [len(images) - 1] * len(texts)
    dataset = ImageTextDataset(
        images,
        labels,
        captions,
        caption_image,
        image_views=views,
        class_names=[e["name"].lower() for e in chosen],
        name=f"emoji-{split}",
        **dataset_kw,
    )
    dataset.categories = [e["category"] for e in chosen]
    dataset.subcategories = [e["subcategory"] for e in chosen]
    return dataset
