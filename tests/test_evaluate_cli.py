"""`metrank evaluate` and eval/evaluate.py end to end on files written to disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from metrank.cli import main
from metrank.embeddings_io import load_array, load_embeddings, load_labels, save_arrays
from metrank.metrics import image_text_metrics, retrieval_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def class_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))  # float64 on disk: converted to float32 on load
    labels = np.tile(np.arange(40), 5)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    save_arrays(str(tmp_path / "all.npz"), embeddings=x, labels=labels)
    return tmp_path, x.astype(np.float32), labels


def test_cli_leave_one_out_prints_table_and_writes_json(class_data, capsys):
    folder, x, labels = class_data
    out = folder / "res" / "metrics.json"
    code = main(
        [
            "evaluate",
            "--query",
            str(folder / "all.npz:embeddings"),
            "--labels",
            str(folder / "all.npz:labels"),
            "--ks",
            "1",
            "5",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed and "MAP@R" in printed
    saved = json.loads(out.read_text())
    assert saved["mode"] == "leave-one-out"
    assert saved["metrics"] == pytest.approx(retrieval_metrics(x, labels, ks=(1, 5)))


def test_cli_query_gallery_from_pt_files(class_data, tmp_path):
    _, x, labels = class_data
    torch.save({"emb": torch.from_numpy(x[:50]), "y": torch.from_numpy(labels[:50])}, tmp_path / "q.pt")
    torch.save(torch.from_numpy(x[50:]), tmp_path / "g.pt")
    np.save(tmp_path / "gl.npy", labels[50:])
    out = tmp_path / "qg.json"
    code = main(
        [
            "evaluate",
            "--query",
            f"{tmp_path}/q.pt:emb",
            "--labels",
            f"{tmp_path}/q.pt:y",
            "--gallery",
            str(tmp_path / "g.pt"),
            "--gallery-labels",
            str(tmp_path / "gl.npy"),
            "--no-map",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["mode"] == "query-gallery" and "MAP@R" not in saved["metrics"]
    assert saved["metrics"] == pytest.approx(
        retrieval_metrics(x[:50], labels[:50], x[50:], labels[50:], map_at_r=False)
    )


def test_script_image_text_mode(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((10, 6)).astype(np.float32)
    ids = np.repeat(np.arange(10), 3)
    texts = images[ids] + 0.8 * rng.standard_normal((30, 6)).astype(np.float32)
    save_arrays(str(tmp_path / "pairs.npz"), images=images, texts=texts, ids=ids)
    out = tmp_path / "it.json"
    src = str(tmp_path / "pairs.npz")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "eval", "evaluate.py"),
            "--images",
            src + ":images",
            "--texts",
            src + ":texts",
            "--text-image-ids",
            src + ":ids",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rsum" in proc.stdout and "t2i_R@1" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["mode"] == "image-text"
    assert saved["metrics"] == pytest.approx(image_text_metrics(images, texts, ids))


def test_cli_errors_exit_2_with_a_message(class_data, capsys):
    folder, _, _ = class_data
    assert main(["evaluate", "--query", str(folder / "missing.npy"), "--labels", str(folder / "labels.npy")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.save(folder / "short.npy", np.arange(7))
    assert main(["evaluate", "--query", str(folder / "emb.npy"), "--labels", str(folder / "short.npy")]) == 2
    assert "length 7 but there are 200" in capsys.readouterr().err
    assert main(["evaluate", "--query", str(folder / "all.npz"), "--labels", str(folder / "labels.npy")]) == 2
    assert "holds several arrays (embeddings, labels)" in capsys.readouterr().err
    assert main(["evaluate", "--query", str(folder / "all.npz:nope"), "--labels", str(folder / "labels.npy")]) == 2
    assert "no array 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--images", str(folder / "emb.npy")]) == 2
    assert "--texts" in capsys.readouterr().err
    assert main(["evaluate", "--query", str(folder / "labels.npy"), "--labels", str(folder / "labels.npy")]) == 2
    assert "must be 2-D" in capsys.readouterr().err


def test_embeddings_io_round_trip_and_dtypes(tmp_path):
    x = np.arange(12, dtype=np.float16).reshape(4, 3)
    save_arrays(str(tmp_path / "a.npz"), x=x, y=np.arange(4))
    assert load_embeddings(str(tmp_path / "a.npz"), key="x").dtype == np.float32
    assert load_labels(str(tmp_path / "a.npz:y"), n=4).dtype == np.int64
    np.testing.assert_array_equal(load_array(str(tmp_path / "a.npz:x")), x)
    with pytest.raises(ValueError, match="writes .npz"):
        save_arrays(str(tmp_path / "a.npy"), x=x)
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_array(str(tmp_path / "a.csv"))
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.npz"]
