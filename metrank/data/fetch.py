"""Getting each dataset onto disk: ``fetch_dataset(name)`` downloads what package registries provide (npm for emoji,
Debian for Tux Paint and Fashion-MNIST) and, for the standard sets that no registry carries, returns instructions
saying where to download them and which layout to unpack under ``$METRANK_DATA/<name>``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from metrank.data.emoji import fetch_emoji
from metrank.data.fashion_mnist import FASHION_MNIST_DIR
from metrank.data.root import data_root
from metrank.data.tuxpaint import TUXPAINT_DIR
from metrank.errors import InputError, StateError

DEBIAN_PACKAGES = {
    "tuxpaint": ("tuxpaint-stamps-default", TUXPAINT_DIR),
    "fashion_mnist": ("dataset-fashion-mnist", FASHION_MNIST_DIR),
}

MANUAL = {
    "cub": (
        "CUB-200-2011 (Wah et al. 2011)",
        "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)",
        "CUB_200_2011/{images.txt,image_class_labels.txt,images/<class>/<image>.jpg}",
    ),
    "cars196": (
        "Stanford Cars (Krause et al. 2013)",
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz + cars_annos.mat; mirrored on "
        "Kaggle as 'stanford-cars-dataset')",
        "cars_annos.mat (or cars_annos.csv with columns relative_im_path,class) and car_ims/<image>.jpg",
    ),
    "sop": (
        "Stanford Online Products (Oh Song et al. 2016)",
        "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)",
        "Stanford_Online_Products/{Ebay_train.txt,Ebay_test.txt,<category>_final/<image>.JPG}",
    ),
    "inshop": (
        "DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016)",
        "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (img.zip, list_eval_partition.txt)",
        "list_eval_partition.txt and img/<...>/<image>.jpg",
    ),
    "flickr30k": (
        "Flickr30K (Young et al. 2014) with Karpathy's split",
        "images: https://shannon.cs.illinois.edu/DenotationGraph/ (request form); split file "
        "dataset_flickr30k.json from https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "dataset_flickr30k.json and flickr30k-images/<image>.jpg",
    ),
    "coco": (
        "MS-COCO 2014 (Lin et al. 2014) with Karpathy's split",
        "images: https://cocodataset.org/#download (train2014.zip, val2014.zip); split file dataset_coco.json "
        "from https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "dataset_coco.json, train2014/<image>.jpg, val2014/<image>.jpg",
    ),
    # bring-your-own-data loaders
    "image_folder": (
        "any folder of images with one sub-folder per class",
        "(your data)",
        "<root>/<class name>/<image>; pass root=<that folder>",
    ),
    "csv": (
        "any CSV / JSON-lines table of image paths and captions",
        "(your data)",
        "a .csv (header row) or .jsonl with columns image, caption [, label, split]; image paths relative to "
        "the file; pass root=<the file>",
    ),
}

USER_DATA = ("image_folder", "csv")


def dataset_location(name: str, root: str | None = None) -> str | None:
    """Where ``name`` is on disk now, or ``None`` if absent (user-data loaders have no fixed place)."""
    if name == "emoji":
        emoji = data_root(root) / "emoji"
        return str(emoji) if (emoji / "emoji-datasource-google" / "package" / "emoji.json").is_file() else None
    if name in DEBIAN_PACKAGES:
        path = DEBIAN_PACKAGES[name][1]
        return path if os.path.isdir(path) else None
    if name in USER_DATA:
        return None
    folder = data_root(root) / name
    return str(folder) if folder.is_dir() else None


def apt_install(packages: Sequence[str], run_apt: bool | None = None) -> None:
    """``apt-get update`` then ``apt-get install -y packages``; ``run_apt`` (default: when running as root with
    apt-get present) allows it, otherwise a ``StateError`` gives the command to run."""
    command = ["apt-get", "install", "-y", "-q", *packages]
    if run_apt is None:
        run_apt = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not run_apt:
        raise StateError(f"install the Debian packages as root: sudo apt-get update && sudo {' '.join(command)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(command, check=True, env=env)


def fetch_dataset(name: str, root: str | None = None, run_apt: bool | None = None) -> str:
    """Fetch ``name`` where a registry provides it; returns a message saying what was done or what to do.

    ``run_apt`` (default: when running as root) lets Debian packages be installed with ``apt-get`` (see
    :func:`apt_install`).
    """
    if name == "emoji":
        return f"emoji data ready under {fetch_emoji(root)}"
    if name in DEBIAN_PACKAGES:
        package, path = DEBIAN_PACKAGES[name]
        if os.path.isdir(path):
            return f"{name}: Debian package {package} already installed at {path}"
        apt_install([package], run_apt)
        return f"{name}: installed {package} at {path}"
    if name in MANUAL:
        title, source, layout = MANUAL[name]
        if name in USER_DATA:
            return f"{name}: {title}; layout: {layout}"
        target = data_root(root) / name
        return (
            f"{name}: {title} is not on a package registry; download it yourself.\n"
            f"  from:   {source}\n  layout: {target}/{layout}\n"
            f"  then:   metrank.data.create_dataset({name!r}) finds it there (or pass root=...)"
        )
    known = sorted({"emoji", *DEBIAN_PACKAGES, *MANUAL})
    raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(known)}")
