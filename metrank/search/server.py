"""HTTP service around a :class:`~metrank.search.Retriever` (FastAPI; run with ``metrank serve DIR``).

Endpoints (OpenAPI docs at ``/docs``): ``GET /`` search page, ``GET /health``, ``GET /stats``,
``POST /search`` (JSON: text or vector), ``POST /search/image`` (multipart image upload), ``POST /items`` (JSON:
vectors or texts with metadata), ``POST /items/images`` (multipart image uploads + metadata), ``GET /items/{id}``,
``GET /items/{id}/image`` (the registered file of that item, looked up by id only), ``DELETE /items/{id}``,
``POST /items/delete``, ``POST /save``.

Safety: bodies larger than ``max_request_bytes`` (JSON) or ``max_upload_bytes`` (multipart) are refused with 413,
by ``Content-Length`` before reading and by counting while streaming otherwise; with ``api_key`` every endpoint but
the page, its static files, ``/health`` and the docs needs the ``X-API-Key`` header. Bad input gets a 4xx with the
reason (400 bad value, 404 unknown id, 413 too large, 415 not an image, 422 malformed body). Searches run in the
threadpool concurrently; mutations are serialised by the retriever's lock.
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import secrets
import tempfile
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from metrank.atomic import atomic_write_bytes
from metrank.errors import InputError, MetrankError, MissingFileError, NotFoundError
from metrank.images import to_rgb
from metrank.search.retriever import Hit, Retriever

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
PUBLIC_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico")
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


class HTTPError(Exception):
    """An error with an HTTP status, turned into ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ------------------------------------------------------------------------------------------------ request bodies
class SearchRequest(BaseModel):
    text: str | None = Field(None, description="query text (needs a model with a text tower)")
    vector: list[float] | None = Field(None, description="query embedding, one float per dimension")
    k: int = Field(10, ge=1, le=1000)
    filter: dict[str, Any] | None = Field(None, description='metadata filter, e.g. {"category": ["a", "b"]}')
    modality: str | None = Field(None, description='restrict results to "image", "text" or "vector" items')
    hubness: bool = Field(True, description="apply the configured hubness correction (if any)")


class AddRequest(BaseModel):
    vectors: list[list[float]] | None = None
    texts: list[str] | None = None
    metadata: list[dict[str, Any]] | None = None
    ids: list[int] | None = None
    modality: str | None = Field(None, description='label for vectors: "image", "text" or "vector"')


class DeleteRequest(BaseModel):
    ids: list[int]


# ------------------------------------------------------------------------------------------------ middleware
class GuardMiddleware:
    """ASGI middleware: API key check, then body size limits (413 by Content-Length or while streaming)."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get(b"x-api-key", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                await _reply(send, 401, "missing or wrong API key: send it in the X-API-Key header")
                return
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.max_upload_bytes if multipart else self.max_request_bytes
        kind = "upload" if multipart else "request body"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, 400, "invalid Content-Length header")
                return
            if declared > limit:
                await _reply(send, 413, f"{kind} of {declared} bytes exceeds the limit of {limit} bytes")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _reply(send, 413, f"{kind} exceeds the limit of {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# ------------------------------------------------------------------------------------------------ helpers
def _hit_json(hit: Hit) -> dict[str, Any]:
    out = hit.to_dict()
    out["image_url"] = f"/items/{hit.id}/image" if hit.path else None
    return out


def _read_image(data: bytes, name: str):
    """Decode an uploaded image (400/413/415 on failure); returns (PIL image RGB, file suffix)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise HTTPError(400, f"upload {name!r} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise HTTPError(413, f"image {name!r} has {img.width}x{img.height} pixels, more than {MAX_IMAGE_PIXELS}")
        img.load()
        img = to_rgb(img)  # the same conversion as images added by path (transparency -> white)
    except UnidentifiedImageError:
        raise HTTPError(
            415, f"upload {name!r} is not an image PIL can read (PNG, JPEG, GIF, WEBP, BMP, TIFF)"
        ) from None
    except HTTPError:
        raise
    except Exception as err:  # truncated or corrupt files raise OSError/SyntaxError/ValueError inside PIL
        raise HTTPError(400, f"upload {name!r} is a corrupt image: {err}") from None
    if fmt not in IMAGE_FORMATS:
        raise HTTPError(415, f"upload {name!r} has image format {fmt}; use one of {sorted(IMAGE_FORMATS)}")
    return img, IMAGE_FORMATS[fmt]


def _parse_json_form(value: str | None, name: str, kind: type):
    if value is None or value == "":
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise HTTPError(422, f"form field {name!r} is not valid JSON: {err}") from None
    if not isinstance(parsed, kind):
        raise HTTPError(422, f"form field {name!r} must be a JSON {kind.__name__}")
    return parsed


# ------------------------------------------------------------------------------------------------ the app
def create_app(
    retriever: Retriever,
    api_key: str | None = None,
    max_request_bytes: int = 8 << 20,
    max_upload_bytes: int = 16 << 20,
    media_dir: str | None = None,
    save_dir: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``retriever``.

    ``media_dir``: where uploaded images are kept so results can show them (default ``<retriever dir>/media`` or a
    temporary folder); ``save_dir``: where ``POST /save`` writes (default: the retriever's directory).
    """
    if max_request_bytes < 1 or max_upload_bytes < 1:
        raise InputError("max_request_bytes and max_upload_bytes must be positive")
    media_dir = media_dir or (
        os.path.join(retriever.directory, "media") if retriever.directory else tempfile.mkdtemp(prefix="metrank-media-")
    )
    app = FastAPI(
        title="metrank search",
        version="1",
        description="Embed-and-search over a metrank Retriever: text, image and vector queries, "
        "metadata filters, item management.",
    )
    app.state.retriever = retriever
    app.add_middleware(
        GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes, max_upload_bytes=max_upload_bytes
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(MetrankError)
    async def _metrank_error(request: Request, err: MetrankError):
        status = 404 if isinstance(err, (NotFoundError, MissingFileError)) else 400
        return JSONResponse({"detail": str(err)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        reasons = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"detail": f"malformed request: {reasons}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    @app.get("/health")
    def health():
        return {"status": "ok", "items": len(retriever)}

    @app.get("/stats")
    def stats():
        return retriever.stats()

    @app.post("/search")
    def search(body: SearchRequest):
        """Search by text or vector (exactly one)."""
        if (body.text is None) == (body.vector is None):
            raise HTTPError(422, "send exactly one of 'text' or 'vector'")
        if body.vector is not None and len(body.vector) != retriever.dim:
            raise HTTPError(422, f"vector has {len(body.vector)} values, this index needs {retriever.dim}")
        vector = None if body.vector is None else _vector(body.vector)
        hits = retriever.search(
            text=body.text, vector=vector, k=body.k, filter=body.filter, modality=body.modality, hubness=body.hubness
        )
        return {"hits": [_hit_json(h) for h in hits]}

    @app.post("/search/image")
    def search_image(
        file: UploadFile = File(...),
        k: int = Form(10, ge=1, le=1000),
        filter: str | None = Form(None),
        modality: str | None = Form(None),
        hubness: bool = Form(True),
    ):
        """Search with an uploaded image (multipart field ``file``)."""
        image, _ = _read_image(file.file.read(), file.filename or "file")
        hits = retriever.search(
            image=image,
            k=k,
            filter=_parse_json_form(filter, "filter", dict),
            modality=modality or None,
            hubness=hubness,
        )
        return {"hits": [_hit_json(h) for h in hits]}

    @app.post("/items")
    def add_items(body: AddRequest):
        """Add vectors or texts (exactly one) with optional metadata and ids."""
        if (body.vectors is None) == (body.texts is None):
            raise HTTPError(422, "send exactly one of 'vectors' or 'texts'")
        if body.vectors is not None:
            bad = [i for i, v in enumerate(body.vectors) if len(v) != retriever.dim]
            if bad or not body.vectors:
                raise HTTPError(
                    422,
                    f"every vector needs {retriever.dim} values (bad rows: {bad[:10]})"
                    if bad
                    else "'vectors' is empty",
                )
            ids = retriever.add(
                vectors=_vector(body.vectors),
                metadata=body.metadata,
                ids=body.ids,
                modality=body.modality,
                progress=False,
            )
        else:
            ids = retriever.add(texts=body.texts, metadata=body.metadata, ids=body.ids, progress=False)
        return {"ids": ids.tolist()}

    @app.post("/items/images")
    def add_images(
        files: list[UploadFile] = File(...), metadata: str | None = Form(None), ids: str | None = Form(None)
    ):
        """Upload images (multipart field ``files``, repeated) with ``metadata`` (a JSON list of dicts)."""
        meta = _parse_json_form(metadata, "metadata", list)
        id_list = _parse_json_form(ids, "ids", list)
        decoded = [(_read_image(f.file.read(), f.filename or "file"), f) for f in files]
        os.makedirs(media_dir, exist_ok=True)
        paths = []
        for (_, suffix), upload in decoded:
            upload.file.seek(0)
            data = upload.file.read()
            path = os.path.join(media_dir, hashlib.sha256(data).hexdigest() + suffix)
            if not os.path.exists(path):
                atomic_write_bytes(path, data)
            paths.append(path)
        new_ids = retriever.add(images=paths, metadata=meta, ids=id_list, progress=False)
        return {"ids": new_ids.tolist()}

    @app.get("/items/{item_id}")
    def get_item(item_id: int):
        item = retriever.get(item_id)
        return {
            "id": item.id,
            "modality": item.modality,
            "text": item.text,
            "metadata": item.metadata,
            "image_url": f"/items/{item.id}/image" if item.path else None,
        }

    @app.get("/items/{item_id}/image")
    def get_image(item_id: int):
        """The image file registered for this item (resolved by id; never a client-supplied path)."""
        item = retriever.get(item_id)
        if not item.path or not os.path.isfile(item.path):
            raise HTTPError(404, f"item {item_id} has no image file")
        media_type = mimetypes.guess_type(item.path)[0] or "application/octet-stream"
        return FileResponse(item.path, media_type=media_type)

    @app.delete("/items/{item_id}")
    def delete_item(item_id: int):
        return {"removed": retriever.remove([item_id])}

    @app.post("/items/delete")
    def delete_items(body: DeleteRequest):
        return {"removed": retriever.remove(body.ids)}

    @app.post("/save")
    def save():
        """Persist the current state (a new crash-safe snapshot)."""
        target = save_dir or retriever.directory
        if not target:
            raise HTTPError(409, "this retriever has no directory to save to; start the server with one")
        return {"snapshot": retriever.save(target)}

    return app


def _vector(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise HTTPError(422, "vectors must contain finite numbers only")
    return array


def serve(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Run the app with uvicorn (blocking). Binds to loopback unless ``host`` says otherwise."""
    import uvicorn

    uvicorn.run(create_app(retriever, **app_kwargs), host=host, port=port, log_level="info")


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
