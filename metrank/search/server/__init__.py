"""HTTP service around a :class:`~metrank.search.Retriever` (FastAPI; run with ``metrank serve DIR``).

Endpoints (schema at ``/openapi.json``; routes in :mod:`metrank.search.server.routes`): ``GET /`` search page,
``GET /health``, ``GET /stats``, ``POST /search``, ``POST /search/image``, ``POST /items``, ``POST /items/images``,
``GET /items/{id}``, ``GET /items/{id}/image``, ``DELETE /items/{id}``, ``POST /items/delete``, ``POST /save``.

Durability: a 200 on a write means it is committed to the retriever's SQLite store (for a saved retriever); a
:class:`~metrank.search.snapshot.Snapshotter` snapshots the index in the background and once more at shutdown
(Ctrl-C, SIGTERM), so restarts replay little. Concurrent searches are coalesced into batched FAISS searches
(:class:`~metrank.search.batcher.QueryBatcher`).

Safe defaults (:mod:`metrank.search.server.guard`): only loopback host names are answered (``allowed_hosts`` adds
others), writes need a JSON body or an ``X-Requested-With`` header and a same-origin ``Origin``, ``api_key``
protects everything but the page and ``/health``, image files are served only from the retriever's media roots,
responses carry no server paths, and the page gets ``nosniff`` and a strict CSP. ``/docs`` is off: Swagger UI
would load its scripts from a CDN (no PyPI package of this environment ships them); ``/openapi.json`` stays.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from metrank.errors import InputError
from metrank.search.batcher import QueryBatcher
from metrank.search.retriever import Retriever
from metrank.search.server.errors import install_error_handlers
from metrank.search.server.guard import GuardMiddleware, allowed_host_set
from metrank.search.server.routes import Service, reads, writes
from metrank.search.snapshot import Snapshotter

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")

__all__ = ["create_app", "serve", "BackgroundServer", "check_port", "check_megabytes"]


def check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port must be an integer from 0 to 65535, got {port!r}")
    return port


def check_megabytes(value: Any, option: str) -> int:
    """A size limit given in MiB as bytes; ``InputError`` naming ``option`` unless finite, > 0 and below 1 TiB."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1 << 20:
        raise InputError(f"{option} must be a number of MiB between 0 and 1048576, got {value!r}")
    return int(value * (1 << 20))


def create_app(
    retriever: Retriever,
    api_key: str | None = None,
    max_request_bytes: int = 8 << 20,
    max_upload_bytes: int = 16 << 20,
    media_dir: str | None = None,
    save_dir: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    bind_host: str = "127.0.0.1",
    snapshot_every_writes: int = 1000,
    snapshot_every_seconds: float = 60.0,
    batch_wait: float = 0.005,
    batching: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``retriever``.

    ``media_dir``: where uploaded images are kept (default ``<retriever dir>/media`` or a temporary folder; it is
    declared a media root); ``save_dir``: where ``POST /save`` writes (default: the retriever's directory);
    ``allowed_hosts``: host names answered besides loopback and ``bind_host`` (``["*"]``: any);
    ``snapshot_every_*``: background index snapshots (saved retrievers only); ``batch_wait``: the longest a batch
    waits for more concurrent queries (adaptive, see :mod:`metrank.search.batcher`; 0: never wait); ``batching=False`` searches each request on
    its own.
    """
    if (
        not (isinstance(max_request_bytes, int) and isinstance(max_upload_bytes, int))
        or min(max_request_bytes, max_upload_bytes) < 1
    ):
        raise InputError("max_request_bytes and max_upload_bytes must be positive integers")
    if media_dir is None:
        media_dir = retriever.media_dir or tempfile.mkdtemp(prefix="metrank-media-")
    os.makedirs(media_dir, exist_ok=True)
    if os.path.realpath(media_dir) != os.path.realpath(retriever.media_dir or "/nonexistent"):
        retriever.add_media_root(media_dir)
    batcher = QueryBatcher(retriever, max_wait=batch_wait, enabled=batching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        snapshotter = None
        if retriever.directory:
            snapshotter = Snapshotter(retriever, snapshot_every_writes, snapshot_every_seconds).start()
        try:
            yield
        finally:
            if snapshotter is not None:
                snapshotter.stop()  # final snapshot: Ctrl-C and SIGTERM both end up here

    app = FastAPI(
        title="metrank search",
        version="1",
        description="Embed-and-search over a metrank Retriever: text, image and vector queries, "
        "metadata filters, item management.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = Service(retriever, batcher, media_dir, save_dir)
    app.state.allowed_hosts = allowed_host_set(bind_host, allowed_hosts)
    app.add_middleware(
        GuardMiddleware,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
        max_upload_bytes=max_upload_bytes,
        allowed_hosts=app.state.allowed_hosts,
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.include_router(reads)
    app.include_router(writes)
    return app


def serve(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Run the app with uvicorn (blocking) until Ctrl-C or SIGTERM, which shut it down cleanly (final snapshot).
    Binds to loopback unless ``host`` says otherwise."""
    import uvicorn

    app = create_app(retriever, bind_host=host, **app_kwargs)
    uvicorn.run(app, host=host, port=check_port(port), log_level="info", timeout_graceful_shutdown=10)


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread (tests, notebooks): ``with BackgroundServer(app) as url: ...``.

    ``port=0`` picks a free port; ``url`` is ``http://host:port``.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading

        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, port))
        self.host, self.port = host, sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{host}:{self.port}"

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
