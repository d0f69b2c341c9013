"""The search page in headless Chromium: it runs ``?q=...`` on load and shows Retriever.search's top results."""

import html.parser
import os
import subprocess

import pytest

from metrank.search import Retriever
from metrank.search.server import BackgroundServer, create_app

CHROMIUM = "/usr/bin/chromium"


class _Hits(html.parser.HTMLParser):
    """Collects ``figure.hit`` ids, their captions, image sources and the status line from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.hits, self.status, self._field = [], "", None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and "hit" in attrs.get("class", ""):
            self.hits.append({"id": int(attrs["data-id"]), "caption": "", "img": None})
        elif tag == "img" and self.hits:
            self.hits[-1]["img"] = attrs.get("src")
        elif tag == "span" and attrs.get("class") == "caption":
            self._field = "caption"
        elif tag == "p" and attrs.get("id") == "status":
            self._field = "status"

    def handle_endtag(self, tag):
        if tag in ("span", "p"):
            self._field = None

    def handle_data(self, data):
        if self._field == "caption":
            self.hits[-1]["caption"] += data
        elif self._field == "status":
            self.status += data


def _dump_dom(url, profile):
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parser = _Hits()
    parser.feed(result.stdout)
    return parser


pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.browser]


@pytest.fixture(scope="module")
def served_emoji():
    from metrank.data import create_dataset
    from metrank.encoders import create_model

    data = create_dataset("emoji", split="test")
    google = [i for i, v in enumerate(data.image_views) if v == "google"][:24]
    retriever = Retriever.create(
        model=create_model("lite0-minilm", image_size=128), media_roots=[os.path.dirname(data.images[google[0]])]
    )
    retriever.add(
        images=[data.images[i] for i in google], metadata=[{"name": data.captions[i]} for i in google], progress=False
    )
    retriever.add(texts=["a cat", "a smiling face"], progress=False)
    with BackgroundServer(create_app(retriever)) as url:
        yield url, retriever


def test_page_shows_the_retrievers_top_results(served_emoji, tmp_path):
    url, retriever = served_emoji
    for query, modality, k in (("cat face", "image", 6), ("smiling", "", 5)):
        page = _dump_dom(f"{url}/?q={query.replace(' ', '+')}&modality={modality}&k={k}", tmp_path / "profile")
        expected = retriever.search(text=query, k=k, modality=modality or None)
        assert [h["id"] for h in page.hits] == [h.id for h in expected]
        assert [h["caption"] for h in page.hits] == [h.metadata.get("name") or h.text for h in expected]
        assert [h["img"] for h in page.hits] == [f"/items/{h.id}/image" if h.path else None for h in expected]
        assert page.status.startswith(f"{k} results")


def test_page_reports_errors(served_emoji, tmp_path):
    url, _ = served_emoji
    page = _dump_dom(f"{url}/?q=cat&k=5000", tmp_path / "profile")  # the server allows k <= 1000
    assert page.hits == [] and page.status.startswith("error:") and "body.k" in page.status
