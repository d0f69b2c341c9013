"""Safe defaults of the HTTP service on a real loopback server: media roots, CSRF, Host allow-list (DNS rebinding),
no server paths in responses, security headers on the page, docs without a CDN."""

import json
import os
import re

import numpy as np
import pytest
import requests
from PIL import Image

from metrank.errors import MetrankError
from metrank.search import Retriever
from metrank.search.server import BackgroundServer, create_app

DIM = 8
ABSOLUTE = re.compile(r"(?<![\w.:])/(?:tmp|root|home|work|etc|usr)/")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    for i, color in enumerate(("red", "green")):
        Image.new("RGB", (8, 8), color).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory, media):
    rng = np.random.default_rng(0)
    r = Retriever.create(dim=DIM, media_roots=[media])
    vectors = rng.standard_normal((2, DIM)).astype(np.float32)
    r.add(images=[media / "0.png", media / "1.png"], vectors=vectors, progress=False)
    r.add(vectors=rng.standard_normal((10, DIM)).astype(np.float32), progress=False)
    r.save(str(tmp_path_factory.mktemp("served")))
    with BackgroundServer(create_app(r)) as url:
        yield url, r


def test_image_paths_outside_media_roots_are_refused(tmp_path, media):
    v = np.ones((1, DIM), np.float32)
    outside = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(outside)
    r = Retriever.create(dim=DIM, media_roots=[media])
    for path in ("/etc/passwd", outside, media / ".." / os.path.basename(tmp_path) / "x.png"):
        with pytest.raises(MetrankError, match="media root"):
            r.add(images=[path], vectors=v)
    os.symlink("/etc/passwd", tmp_path / "link.png")
    with pytest.raises(MetrankError, match="media root"):
        Retriever.create(dim=DIM, media_roots=[tmp_path]).add(images=[tmp_path / "link.png"], vectors=v)
    with pytest.raises(MetrankError, match="media root"):
        Retriever.create(dim=DIM).add(images=[outside], vectors=v)  # no roots declared: nothing is served from disk
    assert len(r) == 0
    assert r.add(images=[media / "0.png"], vectors=v, progress=False).tolist() == [0]


def test_served_images_and_no_server_paths(service, media):
    url, r = service
    assert requests.get(f"{url}/items/1/image").content == (media / "1.png").read_bytes()
    stats = requests.get(f"{url}/stats")
    saved = requests.post(f"{url}/save", json={})
    assert stats.status_code == 200 and saved.status_code == 200
    for response in (stats, saved, requests.get(f"{url}/items/0")):
        assert not ABSOLUTE.search(response.text), response.text
    assert saved.json()["snapshot"].startswith("v")


def test_error_messages_carry_no_server_paths(tmp_path):
    r = Retriever.create(dim=DIM)
    r.model_reference = {"checkpoint": str(tmp_path / "gone" / "model.pt"), "sha256": "0"}
    with BackgroundServer(create_app(r)) as url:
        response = requests.post(f"{url}/search", json={"text": "a cat"})
    assert response.status_code == 404 and "model.pt" in response.json()["detail"]
    assert str(tmp_path) not in response.text


def test_csrf_mutations_need_a_non_simple_same_origin_request(service, media):
    url, r = service
    before = len(r)
    png = (media / "0.png").read_bytes()
    # what a form on another web page can send: multipart or text/plain, no custom header
    assert requests.post(f"{url}/items/images", files=[("files", ("a.png", png, "image/png"))]).status_code == 403
    assert requests.post(f"{url}/save").status_code == 403
    assert requests.post(f"{url}/save", data="{}", headers={"Content-Type": "text/plain"}).status_code == 403
    body = json.dumps({"ids": [5]})
    assert requests.post(f"{url}/items/delete", data=body, headers={"Content-Type": "text/plain"}).status_code == 403
    evil = {"Origin": "http://attacker.example"}
    assert requests.post(f"{url}/items/delete", json={"ids": [5]}, headers=evil).status_code == 403
    assert requests.delete(f"{url}/items/5", headers=evil).status_code == 403
    assert len(r) == before
    same = {"Origin": url, "X-Requested-With": "metrank"}
    uploaded = requests.post(f"{url}/items/images", files=[("files", ("a.png", png, "image/png"))], headers=same)
    assert uploaded.status_code == 400 and "no model" in uploaded.text  # past the CSRF check (vectors-only index)
    added = requests.post(f"{url}/items", json={"vectors": [[0.5] * DIM]}, headers={"Origin": url})
    assert added.status_code == 200, added.text
    assert requests.delete(f"{url}/items/{added.json()['ids'][0]}", headers={"Origin": url}).status_code == 200
    assert len(r) == before


def test_host_allow_list_stops_dns_rebinding(service):
    url, _ = service
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example"):
        assert requests.get(f"{url}/stats", headers={"Host": host}).status_code == 421
        assert requests.post(f"{url}/items/delete", json={"ids": [3]}, headers={"Host": host}).status_code == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert requests.get(f"{url}/health", headers={"Host": host}).status_code == 200


def test_declared_hosts_are_answered():
    r = Retriever.create(dim=DIM)
    with BackgroundServer(create_app(r, allowed_hosts=["search.example.org"])) as url:
        assert requests.get(f"{url}/health", headers={"Host": "search.example.org:443"}).status_code == 200
        assert requests.get(f"{url}/health", headers={"Host": "other.example.org"}).status_code == 421
        origin = {"Origin": "https://search.example.org"}
        assert requests.post(f"{url}/items", json={"vectors": [[1.0] * DIM]}, headers=origin).status_code == 200
    with BackgroundServer(create_app(r, allowed_hosts=["*"])) as url:
        assert requests.get(f"{url}/health", headers={"Host": "anything.example"}).status_code == 200


def test_page_headers_and_offline_docs(service):
    url, _ = service
    page = requests.get(f"{url}/")
    assert page.status_code == 200
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert requests.get(f"{url}/static/app.js").headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(f"{url}/docs").status_code == 404  # Swagger UI would load from a CDN: disabled
    assert "/search" in requests.get(f"{url}/openapi.json").json()["paths"]
    assert "cdn" not in page.text.lower()


class _Buggy(Retriever):
    def stats(self):
        return {}["missing"]  # a programming error, not a user error


def test_programming_errors_are_500_not_404():
    buggy = _Buggy.create(dim=DIM)
    with BackgroundServer(create_app(buggy)) as url:
        response = requests.get(f"{url}/stats")
        assert response.status_code == 500 and "Traceback" not in response.text
        assert requests.get(f"{url}/items/5").status_code == 404  # a real unknown id stays a 404
