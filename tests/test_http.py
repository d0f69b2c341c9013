"""The HTTP service on a real uvicorn server on a loopback port: every endpoint, bad inputs, API key, concurrency."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from metrank.search import Retriever
from metrank.search.server import BackgroundServer, create_app

MAX_UPLOAD = 200_000
MAX_REQUEST = 400_000
UPLOAD = {"X-Requested-With": "metrank"}  # multipart writes need a custom header (CSRF protection)


pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from metrank.data import create_dataset
    from metrank.encoders import create_model

    data = create_dataset("emoji", split="test")
    google = [i for i, v in enumerate(data.image_views) if v == "google"][:16]
    retriever = Retriever.create(
        model=create_model("lite0-minilm", image_size=128), media_roots=[os.path.dirname(data.images[google[0]])]
    )
    retriever.add(
        images=[data.images[i] for i in google],
        progress=False,
        metadata=[{"name": data.captions[i], "group": "emoji"} for i in google],
    )
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, retriever.dim)).astype(np.float32)
    retriever.add(
        vectors=vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
        progress=False,
        metadata=[{"c": i % 5} for i in range(300)],
    )
    directory = tmp_path_factory.mktemp("served")
    retriever.save(str(directory))
    app = create_app(retriever, max_upload_bytes=MAX_UPLOAD, max_request_bytes=MAX_REQUEST)
    with BackgroundServer(app) as url:
        yield url, retriever, [data.images[i] for i in google], rng


def _ids(response):
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["hits"]]


def _png(path):
    with open(path, "rb") as f:
        return f.read()


def test_health_stats_docs(service):
    url, retriever, _, _ = service
    assert requests.get(f"{url}/health").json() == {"status": "ok", "items": len(retriever)}
    stats = requests.get(f"{url}/stats").json()
    assert stats["items"] == len(retriever) and stats["modalities"]["image"] == 16 and stats["dim"] == retriever.dim
    assert requests.get(f"{url}/docs").status_code == 404  # Swagger UI needs a CDN: off, the schema stays
    paths = requests.get(f"{url}/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/items", "/items/images", "/items/{item_id}/image"} <= set(paths)


def test_search_endpoints_equal_retriever(service):
    url, retriever, images, rng = service
    query = rng.standard_normal(retriever.dim).astype(np.float32)
    body = {"vector": query.tolist(), "k": 7, "filter": {"c": [1, 3]}}
    expected = [h.id for h in retriever.search(vector=query, k=7, filter={"c": [1, 3]})]
    assert _ids(requests.post(f"{url}/search", json=body)) == expected
    text_hits = requests.post(f"{url}/search", json={"text": "smiling face", "k": 5, "modality": "image"}).json()
    assert [h["id"] for h in text_hits["hits"]] == [
        h.id for h in retriever.search(text="smiling face", k=5, modality="image")
    ]
    assert all(h["image_url"] == f"/items/{h['id']}/image" for h in text_hits["hits"])
    upload = requests.post(
        f"{url}/search/image",
        files={"file": ("q.png", _png(images[2]), "image/png")},
        data={"k": "3", "modality": "image", "filter": json.dumps({"group": "emoji"})},
    )
    assert _ids(upload) == [h.id for h in retriever.search(image=images[2], k=3, modality="image")]
    assert _ids(upload)[0] == 2  # the same picture comes first


def test_items_add_get_image_delete(service):
    url, retriever, images, rng = service
    vectors = rng.standard_normal((3, retriever.dim)).tolist()
    added = requests.post(f"{url}/items", json={"vectors": vectors, "metadata": [{"tag": "new"}] * 3})
    new_ids = added.json()["ids"]
    assert added.status_code == 200 and len(new_ids) == 3
    item = requests.get(f"{url}/items/{new_ids[0]}").json()
    assert item["metadata"] == {"tag": "new"} and item["modality"] == "vector" and item["image_url"] is None
    texts = requests.post(f"{url}/items", json={"texts": ["a red apple"], "metadata": [{"tag": "fruit"}]}).json()
    assert (
        requests.post(f"{url}/search", json={"text": "a red apple", "k": 1, "modality": "text"}).json()["hits"][0]["id"]
        == texts["ids"][0]
    )
    # image served for a result: exactly the registered file
    assert requests.get(f"{url}/items/0/image").content == _png(images[0])
    uploaded = requests.post(
        f"{url}/items/images",
        files=[("files", ("a.png", _png(images[5]), "image/png"))],
        data={"metadata": json.dumps([{"name": "uploaded"}])},
        headers=UPLOAD,
    )
    up_id = uploaded.json()["ids"][0]
    served = requests.get(f"{url}/items/{up_id}/image")
    assert served.content == _png(images[5]) and served.headers["content-type"] == "image/png"
    assert requests.delete(f"{url}/items/{new_ids[0]}").json() == {"removed": 1}
    assert requests.get(f"{url}/items/{new_ids[0]}").status_code == 404
    assert requests.post(f"{url}/items/delete", json={"ids": new_ids[1:] + [up_id] + texts["ids"]}).json() == {
        "removed": 4
    }
    assert requests.get(f"{url}/health").json()["items"] == len(retriever) == 316
    saved = requests.post(f"{url}/save", json={}).json()["snapshot"]
    reloaded = Retriever.load(retriever.directory)
    assert saved.startswith("v") and len(reloaded) == 316 and reloaded.get(0).metadata["group"] == "emoji"
    reloaded.close()


def test_bad_requests_get_4xx_with_reason(service):
    url, retriever, images, _ = service

    def check(response, status, words):
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]

    big = b"\x89PNG" + b"0" * (MAX_UPLOAD + 10)
    check(requests.post(f"{url}/search/image", files={"file": ("big.png", big, "image/png")}), 413, "exceeds")

    def stream():  # no Content-Length: counted while streaming
        for _ in range(60):
            yield b"x" * 10_000

    check(requests.post(f"{url}/search", data=stream(), headers={"Content-Type": "application/json"}), 413, "exceeds")
    check(
        requests.post(f"{url}/search/image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}),
        415,
        "not an image",
    )
    check(
        requests.post(f"{url}/search/image", files={"file": ("cut.png", _png(images[0])[:60], "image/png")}),
        400,
        "corrupt",
    )
    check(requests.post(f"{url}/search", json={"vector": [0.1, 0.2], "k": 3}), 422, "needs 256")
    check(requests.post(f"{url}/items", json={"vectors": [[0.1] * 10]}), 422, "needs 256")
    check(
        requests.post(f"{url}/search", data=b'{"text": "cat", "k":', headers={"Content-Type": "application/json"}),
        422,
        "malformed",
    )
    check(requests.post(f"{url}/search", json={"text": "cat", "k": 0}), 422, "malformed")
    check(requests.post(f"{url}/search", json={"k": 3}), 422, "exactly one")
    check(requests.post(f"{url}/search", json={"text": "cat", "filter": {"bad'key": 1}}), 400, "filter key")
    check(requests.post(f"{url}/search", json={"text": "cat", "modality": "audio"}), 400, "modality")
    check(requests.get(f"{url}/items/987654"), 404, "unknown id")
    check(requests.get(f"{url}/items/987654/image"), 404, "unknown id")
    check(requests.get(f"{url}/items/20/image"), 404, "no image file")  # a vector item
    check(requests.delete(f"{url}/items/987654"), 404, "unknown id")
    check(requests.post(f"{url}/items", json={"vectors": [[0.0] * 256], "ids": [0]}), 400, "already")
    check(requests.post(f"{url}/search/image", data={"k": "3"}), 422, "malformed")
    check(
        requests.post(
            f"{url}/items/images",
            files=[("files", ("a.png", _png(images[0]), "image/png"))],
            data={"metadata": "{not json"},
            headers=UPLOAD,
        ),
        422,
        "not valid JSON",
    )
    # no path traversal: files are resolved by item id only
    for path in ("/items/..%2F..%2Fetc%2Fpasswd/image", "/static/../../../etc/passwd", "/static/%2e%2e/server.py"):
        response = requests.get(url + path)
        assert response.status_code in (404, 422) and b"root:" not in response.content
    assert requests.get(f"{url}/health").status_code == 200  # the server is still fine


def test_api_key_and_concurrency(service):
    url, retriever, _, rng = service
    with BackgroundServer(create_app(retriever, api_key="s3cret")) as keyed:
        assert requests.post(f"{keyed}/search", json={"text": "cat"}).status_code == 401
        assert requests.post(f"{keyed}/search", json={"text": "cat"}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert requests.get(f"{keyed}/items/0/image").status_code == 401
        assert (
            requests.post(f"{keyed}/search", json={"text": "cat", "k": 2}, headers={"X-API-Key": "s3cret"}).status_code
            == 200
        )
        assert requests.get(f"{keyed}/health").status_code == 200 and requests.get(f"{keyed}/").status_code == 200

    queries = rng.standard_normal((40, retriever.dim)).astype(np.float32)
    bodies = [{"vector": q.tolist(), "k": 10, "filter": {"c": i % 5} if i % 2 else None} for i, q in enumerate(queries)]
    serial = [_ids(requests.post(f"{url}/search", json=b)) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda b: _ids(requests.post(f"{url}/search", json=b)), bodies))
    assert parallel == serial
    before = len(retriever)

    def add_then_search(i):
        vectors = rng.standard_normal((5, retriever.dim)).tolist()
        added = requests.post(f"{url}/items", json={"vectors": vectors, "metadata": [{"writer": i}] * 5})
        found = requests.post(f"{url}/search", json={"vector": vectors[0], "k": 1, "filter": {"writer": i}})
        return added.json()["ids"], found.json()["hits"][0]["id"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(add_then_search, range(16)))
    all_ids = [i for ids, _ in results for i in ids]
    assert len(set(all_ids)) == 80 and len(retriever) == before + 80
    assert all(found == ids[0] for ids, found in results)
    assert requests.post(f"{url}/items/delete", json={"ids": all_ids}).json() == {"removed": 80}
