"""Hostile but fair input to the Retriever and the HTTP service: every case is a clear MetrankError / 4xx naming the
problem, never an OverflowError, a 500, a traceback or a poisoned state that breaks later calls."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
import requests
import torch

from metrank.errors import MetrankError, NotFoundError, StateError
from metrank.search import Retriever
from metrank.search.server import BackgroundServer, create_app

DIM = 8
HUGE = 2**70


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def retriever():
    r = Retriever.create(dim=DIM)
    r.add(vectors=_unit(np.random.default_rng(0), 50), metadata=[{"c": i % 3} for i in range(50)], progress=False)
    return r


def _bomb_png(path, side=30000):
    """A tiny PNG whose header claims side x side pixels (a decompression bomb for PIL)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    body = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(body)
    return path


# ------------------------------------------------------------------------------------------------ Python API
def test_out_of_range_ids_and_filter_values(retriever):
    q = _unit(np.random.default_rng(1), 1)[0]
    with pytest.raises(NotFoundError, match="unknown id"):
        retriever.remove([HUGE])
    with pytest.raises(NotFoundError, match="unknown id"):
        retriever.remove([-1])
    with pytest.raises(NotFoundError, match="unknown id"):
        retriever.get(HUGE)
    with pytest.raises(MetrankError, match="64-bit"):
        retriever.search(vector=q, filter={"c": HUGE})
    with pytest.raises(MetrankError, match="64-bit"):
        retriever.search(vector=q, filter={"c": [1, -HUGE]})
    with pytest.raises(MetrankError, match="finite"):
        retriever.search(vector=q, filter={"c": float("nan")})
    assert len(retriever) == 50


def test_explicit_max_id_cannot_poison_next_id(retriever):
    v = _unit(np.random.default_rng(2), 2)
    with pytest.raises(MetrankError, match="ids must be"):
        retriever.add(vectors=v[:1], ids=[2**63 - 1])
    with pytest.raises(MetrankError, match="ids must be"):
        retriever.add(vectors=v[:1], ids=np.array([2**64 - 1], dtype=np.uint64))
    assert retriever.add(vectors=v, progress=False).tolist() == [50, 51]  # automatic ids still work


def test_nan_metadata_and_huge_vectors_are_refused(retriever):
    rng = np.random.default_rng(3)
    v = _unit(rng, 1)
    for bad in (float("nan"), float("inf"), [1, float("-inf")]):
        with pytest.raises(MetrankError, match="metadata"):
            retriever.add(vectors=v, metadata=[{"x": bad}])
    with pytest.raises(MetrankError, match="metadata"):
        retriever.add(vectors=v, metadata=[{"x": HUGE}])
    with pytest.raises(MetrankError, match="norm"):
        retriever.add(vectors=np.full((1, DIM), 3e38, np.float32))
    with pytest.raises(MetrankError, match="norm"):
        retriever.search(vector=np.full(DIM, 3e38, np.float32))
    assert len(retriever) == 50 and len(retriever.store) == 50
    hits = retriever.search(vector=v[0], k=5, filter={"c": 1})  # filtered search still works
    assert len(hits) == 5 and all(h.metadata["c"] == 1 for h in hits)


@pytest.mark.slow
def test_decompression_bomb_is_an_input_error(tmp_path):
    from metrank.encoders import create_model
    from metrank.images import ImageLoadError

    bomb = _bomb_png(tmp_path / "bomb.png")
    r = Retriever.create(model=create_model("lite0-minilm", image_size=64), media_roots=[tmp_path])
    with pytest.raises(ImageLoadError, match="bomb"):
        r.add(images=[bomb], progress=False)
    with pytest.raises(ImageLoadError, match="bomb"):
        r.search(image=bomb)
    assert len(r) == 0


def test_read_only_searches_never_write(tmp_path, retriever):
    retriever.save(str(tmp_path))
    loaded = Retriever.load(str(tmp_path))
    db = tmp_path / "items.sqlite"
    before = (db.stat().st_size, loaded.store.schema_objects())
    changes = loaded.store.total_changes()
    q = _unit(np.random.default_rng(4), 1)[0]
    for i in range(30):
        loaded.search(vector=q, k=3, filter={f"key{i}": i})
    assert loaded.store.total_changes() == changes
    assert (db.stat().st_size, loaded.store.schema_objects()) == before


# ------------------------------------------------------------------------------------------------ damaged folders
def _saved(tmp_path, retriever):
    retriever.save(str(tmp_path))
    snapshot = json.loads((tmp_path / "MANIFEST.json").read_text())["snapshot"]
    return tmp_path / snapshot


def _rewrite_config(snapshot, **changes):
    config = json.loads((snapshot / "config.json").read_text())
    config.update(changes)
    (snapshot / "config.json").write_text(json.dumps(config))
    return config


def _resign(snapshot, name):
    import hashlib

    config = json.loads((snapshot / "config.json").read_text())
    config["files"][name] = hashlib.sha256((snapshot / name).read_bytes()).hexdigest()
    (snapshot / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, file",
    [
        ("manifest_no_snapshot", "MANIFEST.json"),
        ("manifest_list", "MANIFEST.json"),
        ("manifest_not_json", "MANIFEST.json"),
        ("manifest_escape", "MANIFEST.json"),
        ("config_no_files", "config.json"),
        ("config_wrong_type", "config.json"),
        ("index_truncated", "index.faiss"),
        ("sqlite_truncated", "items.sqlite"),
    ],
)
def test_damaged_folders_name_the_file(tmp_path, retriever, damage, file):
    snapshot = _saved(tmp_path, retriever)
    manifest = tmp_path / "MANIFEST.json"
    if damage == "manifest_no_snapshot":
        manifest.write_text(json.dumps({"version": 1}))
    elif damage == "manifest_list":
        manifest.write_text(json.dumps([1, 2]))
    elif damage == "manifest_not_json":
        manifest.write_text("{not json")
    elif damage == "manifest_escape":
        manifest.write_text(json.dumps({"version": 1, "snapshot": "../../etc"}))
    elif damage == "config_no_files":
        config = json.loads((snapshot / "config.json").read_text())
        del config["files"]
        (snapshot / "config.json").write_text(json.dumps(config))
    elif damage == "config_wrong_type":
        _rewrite_config(snapshot, dim="eight")
    elif damage == "index_truncated":
        data = (snapshot / "index.faiss").read_bytes()
        (snapshot / "index.faiss").write_bytes(data[: len(data) // 2])
        _resign(snapshot, "index.faiss")
    elif damage == "sqlite_truncated":
        db = tmp_path / "items.sqlite"
        data = db.read_bytes()
        db.write_bytes(data[:1500])
        for extra in ("items.sqlite-wal", "items.sqlite-shm"):
            if (tmp_path / extra).exists():
                os.remove(tmp_path / extra)
    with pytest.raises(StateError, match=file.replace(".", r"\.")) as err:
        Retriever.load(str(tmp_path))
    assert "restore" in str(err.value) or "rebuild" in str(err.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.slow
def test_malicious_checkpoint_is_refused_clearly(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "metrank.encoder.v1", "config": _Evil(), "state_dict": {}}, evil)
    with pytest.raises(StateError, match="evil.pt") as err:
        Retriever.create(model=str(evil))
    assert "weights_only=False" not in str(err.value)


# ------------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def service():
    r = Retriever.create(dim=DIM)
    r.add(vectors=_unit(np.random.default_rng(5), 40), metadata=[{"c": i % 4} for i in range(40)], progress=False)
    with BackgroundServer(create_app(r)) as url:
        yield url, r


def _bad(response, status=None):
    assert 400 <= response.status_code < 500 and status in (None, response.status_code), response.text
    assert "detail" in response.json()
    return response.json()["detail"]


def test_http_hostile_values_are_4xx(service):
    url, r = service
    q = [0.1] * DIM
    assert _bad(requests.get(f"{url}/items/{HUGE}"), 404)
    assert requests.get(f"{url}/items/{HUGE}").status_code == 404
    assert requests.post(f"{url}/items/delete", json={"ids": [HUGE]}).status_code == 404
    assert requests.delete(f"{url}/items/{HUGE}").status_code == 404
    assert "64-bit" in _bad(requests.post(f"{url}/search", json={"vector": q, "filter": {"c": HUGE}}))
    assert "ids must be" in _bad(requests.post(f"{url}/items", json={"vectors": [q], "ids": [2**63 - 1]}))
    nan_body = '{"vectors": [[' + ",".join(["0.1"] * DIM) + ']], "metadata": [{"x": NaN}]}'
    _bad(requests.post(f"{url}/items", data=nan_body, headers={"Content-Type": "application/json"}))
    _bad(requests.post(f"{url}/items", json={"vectors": [[3e38] * DIM]}))
    _bad(requests.post(f"{url}/search", json={"vector": [3e38] * DIM}))
    assert requests.post(f"{url}/search", json={"vector": q, "k": 3, "filter": {"c": 1}}).status_code == 200
    assert len(r) == 40


def test_http_bomb_upload_is_4xx(service, tmp_path):
    url, _ = service
    data = _bomb_png(tmp_path / "bomb.png").read_bytes()
    response = requests.post(f"{url}/search/image", files={"file": ("bomb.png", data, "image/png")})
    assert response.status_code in (400, 413) and "pixels" in response.json()["detail"]


def test_cli_port_and_size_options_are_checked(tmp_path, retriever):
    import argparse

    from metrank.commands import search as search_command

    retriever.save(str(tmp_path))
    parser = argparse.ArgumentParser(prog="metrank")
    search_command.register(parser.add_subparsers())
    for argv, words in (
        (["--port", "99999"], "port"),
        (["--port", "-1"], "port"),
        (["--max-upload-mb", "inf"], "max-upload-mb"),
        (["--max-request-mb", "nan"], "max-request-mb"),
    ):
        args = parser.parse_args(["serve", str(tmp_path), *argv])
        with pytest.raises(MetrankError, match=words):
            args.func(args)


def test_http_more_hostile_bodies_are_4xx(service):
    url, r = service
    q = [0.1] * DIM
    many = requests.post(f"{url}/search", json={"vector": q, "k": 3, "filter": {"c": list(range(40_000))}})
    assert many.status_code == 200 and len(many.json()["hits"]) == 3  # large IN lists are fine
    deep = "[" * 50_000 + "]" * 50_000
    body = '{"vectors": [[' + ",".join(["0.1"] * DIM) + ']], "metadata": [{"x": ' + deep + "}]}"
    _bad(requests.post(f"{url}/items", data=body, headers={"Content-Type": "application/json"}))
    _bad(requests.post(f"{url}/search", data='{"filter": ' + deep + "}", headers={"Content-Type": "application/json"}))
    _bad(requests.post(f"{url}/items", json={"vectors": [q[:3], q]}))  # ragged
    _bad(requests.post(f"{url}/items", json={"vectors": [q], "metadata": [{"x": [[[1]]]}] * 2}))
    assert requests.get(f"{url}/health").json()["items"] == len(r) == 40
