"""Data loaders: standard layouts on small fixtures written here in the real formats; the offline sets (emoji,
Tux Paint, Fashion-MNIST) on the real data; unreadable images and empty captions."""

import argparse
import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

from metrank.data import DATASETS, ImageLabelDataset, ImageLoadError, ImageTextDataset, create_dataset, open_rgb
from metrank.errors import InputError


def write_png(path, color=(255, 0, 0), size=(8, 6), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, format="PNG")  # PNG bytes whatever the extension: exact pixels
    return path


# ------------------------------------------------------------------------------------------- standard layouts
def test_cub_layout_and_class_disjoint_split(tmp_path):
    base = tmp_path / "CUB_200_2011"
    rows, labels = [], []
    for i, (cls, name) in enumerate(
        [(1, "001.A/a1.jpg"), (1, "001.A/a2.jpg"), (100, "100.B/b.jpg"), (101, "101.C/c.jpg"), (200, "200.D/d.jpg")],
        start=1,
    ):
        write_png(str(base / "images" / name), color=(i, 0, 0))
        rows.append(f"{i} {name}")
        labels.append(f"{i} {cls}")
    (base / "images.txt").write_text("\n".join(rows) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    train = create_dataset("cub", root=str(tmp_path), split="train")
    test = create_dataset("cub", root=str(tmp_path), split="test")
    assert [os.path.basename(p) for p in train.paths] == ["a1.jpg", "a2.jpg", "b.jpg"]
    assert train.labels.tolist() == [0, 0, 1] and train.class_names == ["1", "100"]
    assert test.labels.tolist() == [0, 1] and test.class_names == ["101", "200"]
    image, label = test[1]
    assert image.size == (8, 6) and image.getpixel((0, 0)) == (5, 0, 0) and label == 1
    assert len(create_dataset("cub", root=str(base), split="all")) == 5  # root may be the CUB folder itself


def test_cars196_mat_and_csv(tmp_path):
    from scipy.io import savemat

    annotations = [
        ("car_ims/000001.jpg", 1),
        ("car_ims/000002.jpg", 98),
        ("car_ims/000003.jpg", 99),
        ("car_ims/000004.jpg", 196),
    ]
    for path, _ in annotations:
        write_png(str(tmp_path / "mat" / path))
    record = np.zeros(len(annotations), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, (path, cls) in enumerate(annotations):
        record[i] = (path, np.array([[cls]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    savemat(str(tmp_path / "mat" / "cars_annos.mat"), {"annotations": record.reshape(1, -1)})
    train = create_dataset("cars196", root=str(tmp_path / "mat"), split="train")
    test = create_dataset("cars196", root=str(tmp_path / "mat"), split="test")
    assert train.class_names == ["1", "98"] and test.class_names == ["99", "196"]
    assert train.paths[1] == str(tmp_path / "mat" / "car_ims" / "000002.jpg")
    assert test[0][0].size == (8, 6)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "cars_annos.csv").write_text(
        "relative_im_path,class\n" + "".join(f"{p},{c}\n" for p, c in annotations)
    )
    from_csv = create_dataset("cars196", root=str(tmp_path / "csv"), split="test")
    assert from_csv.class_names == test.class_names and len(from_csv) == 2


def test_sop_files_and_super_labels(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    base.mkdir()
    header = "image_id class_id super_class_id path\n"
    (base / "Ebay_train.txt").write_text(
        header + "1 1 1 bicycle_final/a.JPG\n2 1 1 bicycle_final/b.JPG\n3 2 2 chair_final/c.JPG\n"
    )
    (base / "Ebay_test.txt").write_text(header + "4 11319 3 cabinet_final/d.JPG\n5 11320 3 cabinet_final/e.JPG\n")
    train = create_dataset("sop", root=str(tmp_path), split="train")
    assert train.labels.tolist() == [0, 0, 1] and train.super_labels.tolist() == [0, 0, 1]
    assert train.paths[2] == str(base / "chair_final" / "c.JPG")
    test = create_dataset("sop", root=str(tmp_path), split="test")
    assert test.labels.tolist() == [0, 1] and test.class_names == ["11319", "11320"]
    assert len(create_dataset("sop", root=str(tmp_path), split="all")) == 5


def test_inshop_query_gallery_share_labels(tmp_path):
    rows = [
        ("img/WOMEN/Dresses/id_1/01.jpg", "id_00000001", "train"),
        ("img/WOMEN/Dresses/id_2/01.jpg", "id_00000002", "query"),
        ("img/WOMEN/Dresses/id_3/01.jpg", "id_00000003", "query"),
        ("img/WOMEN/Dresses/id_2/02.jpg", "id_00000002", "gallery"),
        ("img/WOMEN/Dresses/id_3/02.jpg", "id_00000003", "gallery"),
        ("img/WOMEN/Dresses/id_4/01.jpg", "id_00000004", "gallery"),
    ]
    (tmp_path / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{p} {i} {s}\n" for p, i, s in rows)
    )
    query = create_dataset("inshop", root=str(tmp_path), split="query")
    gallery = create_dataset("inshop", root=str(tmp_path), split="gallery")
    assert query.labels.tolist() == [0, 1] and gallery.labels.tolist() == [0, 1, 2]
    assert query.paths[0] == str(tmp_path / "img/WOMEN/Dresses/id_2/01.jpg")
    assert len(create_dataset("inshop", root=str(tmp_path), split="train")) == 1
    with pytest.raises(ValueError, match="query, gallery"):
        create_dataset("inshop", root=str(tmp_path), split="test")


def karpathy_json(path, entries):
    path.write_text(json.dumps({"images": entries, "dataset": "x"}))


def test_flickr30k_and_coco_karpathy(tmp_path):
    entries = [
        {
            "filename": f"{i}.jpg",
            "split": split,
            "imgid": i,
            "sentences": [{"raw": f"caption {i}.{j}", "tokens": []} for j in range(5)],
        }
        for i, split in enumerate(["train", "train", "val", "test"])
    ]
    karpathy_json(tmp_path / "dataset_flickr30k.json", entries)
    test = create_dataset("flickr30k", root=str(tmp_path), split="test")
    assert isinstance(test, ImageTextDataset)
    assert test.images == [str(tmp_path / "flickr30k-images" / "3.jpg")]
    assert test.captions == [f"caption 3.{j}" for j in range(5)] and test.caption_image.tolist() == [0] * 5
    train = create_dataset("flickr30k", root=str(tmp_path), split="train")
    assert len(train.images) == 2 and len(train) == 10 and train.caption_image.tolist() == [0] * 5 + [1] * 5
    assert train.caption_labels.tolist() == [0] * 5 + [1] * 5

    coco = [
        {
            "filepath": "val2014",
            "filename": f"COCO_val2014_{i}.jpg",
            "split": s,
            "cocoid": i,
            "sentences": [{"raw": f"c{i}"}],
        }
        for i, s in enumerate(["train", "restval", "test"])
    ]
    karpathy_json(tmp_path / "dataset_coco.json", coco)
    assert len(create_dataset("coco", root=str(tmp_path), split="train").images) == 2
    assert len(create_dataset("coco", root=str(tmp_path), split="train", restval=False).images) == 1
    coco_test = create_dataset("coco", root=str(tmp_path), split="test")
    assert coco_test.images == [str(tmp_path / "val2014" / "COCO_val2014_2.jpg")]


def test_image_folder_split_is_class_disjoint(tmp_path):
    for c in range(6):
        for k in range(2):
            write_png(str(tmp_path / f"class{c}" / f"{k}.png"), color=(c, k, 0))
    (tmp_path / "class0" / "notes.txt").write_text("not an image")
    full = create_dataset("image_folder", root=str(tmp_path), split="all")
    assert len(full) == 12 and full.class_names == [f"class{c}" for c in range(6)]
    train = create_dataset("image_folder", root=str(tmp_path), split="train", test_fraction=0.5, seed=1)
    test = create_dataset("image_folder", root=str(tmp_path), split="test", test_fraction=0.5, seed=1)
    assert not set(train.class_names) & set(test.class_names) and len(train) + len(test) == 12
    assert (
        test.class_names
        == create_dataset("image_folder", root=str(tmp_path), split="test", test_fraction=0.5, seed=1).class_names
    )


def test_csv_and_jsonl_caption_tables(tmp_path):
    write_png(str(tmp_path / "imgs" / "a.png"))
    write_png(str(tmp_path / "imgs" / "b.png"))
    (tmp_path / "pairs.csv").write_text(
        "image,caption,split\nimgs/a.png,a red square,train\nimgs/a.png,red block,train\nimgs/b.png,another one,test\n"
    )
    train = create_dataset("csv", root=str(tmp_path / "pairs.csv"), split="train")
    assert train.images == [str(tmp_path / "imgs" / "a.png")] and train.captions == ["a red square", "red block"]
    image, caption, label = train[1]
    assert image.size == (8, 6) and caption == "red block" and label == 0
    rows = [
        {"image": "imgs/a.png", "caption": "x", "label": "k"},
        {"image": "imgs/b.png", "caption": "y", "label": "k"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = create_dataset("csv", root=str(tmp_path / "pairs.jsonl"))
    assert table.image_labels.tolist() == [0, 0]  # the label column groups images
    (tmp_path / "empty.csv").write_text("image,caption\nimgs/a.png,ok\nimgs/b.png,  \n")
    with pytest.raises(ValueError, match="empty captions.*b.png"):
        create_dataset("csv", root=str(tmp_path / "empty.csv"))
    with pytest.warns(RuntimeWarning, match="skipping 1 empty captions"):
        skipped = create_dataset("csv", root=str(tmp_path / "empty.csv"), empty_captions="skip")
    assert skipped.captions == ["ok"] and skipped.skipped_captions == [(str(tmp_path / "imgs" / "b.png"), 1)]
    with pytest.raises(ValueError, match="no column 'text'"):
        create_dataset("csv", root=str(tmp_path / "pairs.csv"), caption_column="text")


# ------------------------------------------------------------------------------------------- unreadable images
def test_corrupt_and_missing_images_are_reported_with_their_paths(tmp_path):
    good = [write_png(str(tmp_path / f"g{i}.png"), color=(i, 0, 0)) for i in range(3)]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = str(tmp_path / "gone.png")
    items = [(good[0], 0), (str(corrupt), 0), (good[1], 0), (missing, 1), (good[2], 1)]
    strict = ImageLabelDataset(items)
    with pytest.raises(ImageLoadError, match="broken.jpg") as err:
        strict[1]
    assert err.value.path == str(corrupt)
    with pytest.raises(ImageLoadError, match="gone.png.*file not found"):
        open_rgb(missing)
    assert [path for path, _ in strict.scan(progress=False)] == [str(corrupt), missing]

    lenient = ImageLabelDataset(items, on_error="skip")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        image, label = lenient[1]
    assert label == 0 and image.getpixel((0, 0)) == (1, 0, 0)  # next readable image of the same label
    with pytest.warns(RuntimeWarning, match="gone.png"):
        image, label = lenient[3]
    assert label == 1 and image.getpixel((0, 0)) == (2, 0, 0)
    assert set(lenient.bad_paths) == {str(corrupt), missing}
    lenient.scan(remove=True, progress=False)
    assert lenient.paths == good and lenient.labels.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="on_error"):
        ImageLabelDataset(items, on_error="ignore")


# ------------------------------------------------------------------------------------------- offline sets
@pytest.fixture(scope="module")
def emoji_all():
    return create_dataset("emoji", split="all", download=True)


def test_emoji_identities_views_and_split(emoji_all):
    assert len(np.unique(emoji_all.image_labels)) == 1911 and len(emoji_all.images) == 2 * 1911
    assert sorted(set(emoji_all.image_views)) == ["google", "twitter"]
    train, test = create_dataset("emoji", split="train"), create_dataset("emoji", split="test")
    train_names, test_names = set(train.class_names), set(test.class_names)
    assert not train_names & test_names
    assert len(test.class_names) == round(0.3 * 1911) and len(train.class_names) + len(test.class_names) == 1911
    assert create_dataset("emoji", split="test").images == test.images  # deterministic
    # every identity has one image per vendor with the same caption, named after the identity
    for label in range(0, len(test.class_names), 97):
        rows = np.flatnonzero(test.image_labels == label)
        assert sorted(test.image_views[rows]) == ["google", "twitter"]
        assert test.captions[rows[0]] == test.captions[rows[1]]
        assert test.captions[rows[0]].startswith(test.class_names[label])
    hash_key = emoji_all.captions[emoji_all.class_names.index("hash key") * 2]
    assert hash_key == "hash key, hash"
    image = emoji_all.load_image(0)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited on white
    twitter = test.select_view("twitter")
    assert len(twitter.images) == len(test.class_names) and set(twitter.image_views) == {"twitter"}
    images = test.image_dataset()
    assert isinstance(images, ImageLabelDataset) and images.labels.tolist() == test.image_labels.tolist()


def test_tuxpaint_real_stamps():
    stamps = create_dataset("tuxpaint", split="all")
    assert len(stamps.images) == 950 and len(stamps.class_names) == 125  # 785 PNG + 165 SVG-only stamps
    i = stamps.images.index("/usr/share/tuxpaint/stamps/symbols/money/us/coins/025quarter.png")
    assert stamps.captions[i] == "A US 25 cent piece ($.25) called a quarter."
    assert stamps.class_names[stamps.image_labels[i]] == "symbols/money/us/coins"
    svg = next(j for j, p in enumerate(stamps.images) if p.endswith(".svg"))
    rendered = stamps.load_image(svg)
    assert rendered.mode == "RGB" and max(rendered.size) == 256
    train, test = create_dataset("tuxpaint", split="train"), create_dataset("tuxpaint", split="test")
    assert not set(train.images) & set(test.images) and len(train.images) + len(test.images) == 950
    by_category = create_dataset("tuxpaint", split="test", split_by="category")
    assert not set(by_category.class_names) & set(
        create_dataset("tuxpaint", split="train", split_by="category").class_names
    )


def test_fashion_mnist_real_files():
    train = create_dataset("fashion_mnist", split="train")
    test = create_dataset("fashion_mnist", split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert np.bincount(train.labels).tolist() == [6000] * 10  # published class balance
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
        first = np.frombuffer(f.read()[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    image, label = test[0]
    assert image.size == (28, 28) and label == 9  # the first test item is an ankle boot
    np.testing.assert_array_equal(np.asarray(image)[:, :, 0], first)
    disjoint = create_dataset("fashion_mnist", split="test", class_disjoint=True)
    assert len(disjoint) == 35000 and disjoint.class_names == ["sandal", "shirt", "sneaker", "bag", "ankle boot"]


# ------------------------------------------------------------------------------------------- registry + CLI
def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*emoji.*tuxpaint"):
        create_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="metrank data fetch cub"):
        create_dataset("cub", root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="split must be one of train, test, all"):
        create_dataset("emoji", split="validation")
    assert {
        "emoji",
        "tuxpaint",
        "fashion_mnist",
        "cub",
        "cars196",
        "sop",
        "inshop",
        "flickr30k",
        "coco",
        "image_folder",
        "csv",
    } == set(DATASETS.names())


def test_data_command_list_and_fetch(capsys, tmp_path):
    from metrank.commands import data

    parser = argparse.ArgumentParser()
    data.register(parser.add_subparsers())
    for argv in (
        ["data", "list", "--root", str(tmp_path)],
        ["data", "fetch", "sop", "--root", str(tmp_path)],
        ["data", "fetch", "fashion_mnist", "--no-apt"],  # never installs: the install step did
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "tuxpaint       ready: /usr/share/tuxpaint/stamps" in out
    assert "emoji          missing: metrank data fetch emoji" in out  # empty --root
    assert f"layout: {tmp_path}/sop/Stanford_Online_Products/{{Ebay_train.txt" in out
    assert "already installed at /usr/share/datasets/fashion-mnist" in out


@pytest.mark.data
def test_emoji_phrase_captions_split_the_joined_caption(emoji_all):
    phrases = create_dataset("emoji", split="test", caption_mode="phrases")
    joined = create_dataset("emoji", split="test")
    assert phrases.images == joined.images and len(phrases.captions) > len(joined.captions)
    for image in (0, 1, 100, len(joined.images) - 1):
        mine = [c for c, i in zip(phrases.captions, phrases.caption_image) if i == image]
        assert ", ".join(mine) == joined.captions[image]
    with pytest.raises(InputError, match="caption_mode must be one of joined, phrases"):
        create_dataset("emoji", split="test", caption_mode="words")
