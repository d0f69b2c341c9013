"""The service's routes as FastAPI routers over one :class:`Service` (reached through the ``service`` dependency).

``reads``: ``/health``, ``/stats``, ``POST /search`` (text or vector), ``POST /search/image`` (multipart upload),
``GET /items/{id}``, ``GET /items/{id}/image``. ``writes`` (each behind :func:`same_origin_write`): ``POST /items``,
``POST /items/images``, ``DELETE /items/{id}``, ``POST /items/delete``, ``POST /save``. A 200 on a write means it is
committed to disk (for a saved retriever). Searches go through the :class:`~metrank.search.batcher.QueryBatcher`.
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from metrank.atomic import atomic_write_bytes
from metrank.images import to_rgb
from metrank.search.batcher import QueryBatcher
from metrank.search.retriever import Retriever
from metrank.search.server.errors import HTTPError
from metrank.search.server.guard import same_origin_write
from metrank.search.store import Item

MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Service:
    """What the routes work on: the retriever, its query batcher, where uploads go, where ``/save`` writes."""

    retriever: Retriever
    batcher: QueryBatcher
    media_dir: str
    save_dir: str | None


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


# ------------------------------------------------------------------------------------------------ bodies
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


# ------------------------------------------------------------------------------------------------ helpers
def item_json(item: Item) -> dict[str, Any]:
    """The HTTP form of an item or a hit: :meth:`Item.to_dict` plus the URL of its image."""
    out = item.to_dict()
    out["image_url"] = f"/items/{item.id}/image" if out["has_image"] else None
    return out


def _vectors(values: list, dim: int, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except ValueError:  # ragged lists
        raise HTTPError(422, f"{what}: every vector needs {dim} values") from None
    if array.ndim < 1 or array.shape[-1] != dim or array.size == 0:
        raise HTTPError(422, f"{what}: every vector needs {dim} values, this index needs {dim} (got {array.shape})")
    if not np.isfinite(array).all() or (np.abs(array) > np.finfo(np.float32).max).any():
        raise HTTPError(422, f"{what} must contain finite float32 numbers only")
    return array.astype(np.float32)


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
        rgb = to_rgb(img)  # the same conversion as images added by path (transparency -> white)
    except Image.DecompressionBombError as err:
        raise HTTPError(413, f"image {name!r} is too large: {err}") from None
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
    return rgb, IMAGE_FORMATS[fmt]


def _json_form(value: str | None, name: str, kind: type):
    if value is None or value == "":
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise HTTPError(422, f"form field {name!r} is not valid JSON: {err}") from None
    if not isinstance(parsed, kind):
        raise HTTPError(422, f"form field {name!r} must be a JSON {kind.__name__}")
    return parsed


# ------------------------------------------------------------------------------------------------ reads
reads = APIRouter()


@reads.get("/health")
def health(svc: ServiceDep):
    return {"status": "ok", "items": len(svc.retriever)}


@reads.get("/stats")
def stats(svc: ServiceDep):
    return {**svc.retriever.stats(), "batches": svc.batcher.batches, "batched_queries": svc.batcher.queries}


@reads.post("/search")
def search(body: SearchRequest, svc: ServiceDep):
    """Search by text or vector (exactly one)."""
    if (body.text is None) == (body.vector is None):
        raise HTTPError(422, "send exactly one of 'text' or 'vector'")
    r = svc.retriever
    query = r.embed_query(text=body.text) if body.vector is None else _vectors(body.vector, r.dim, "vector")
    hits = svc.batcher.search(query, k=body.k, filter=body.filter, modality=body.modality, hubness=body.hubness)
    return {"hits": [item_json(h) for h in hits]}


@reads.post("/search/image")
def search_image(
    svc: ServiceDep,
    file: UploadFile = File(...),
    k: int = Form(10, ge=1, le=1000),
    filter: str | None = Form(None),
    modality: str | None = Form(None),
    hubness: bool = Form(True),
):
    """Search with an uploaded image (multipart field ``file``)."""
    image, _ = _read_image(file.file.read(), file.filename or "file")
    query = svc.retriever.embed_query(image=image)
    hits = svc.batcher.search(
        query, k=k, filter=_json_form(filter, "filter", dict), modality=modality or None, hubness=hubness
    )
    return {"hits": [item_json(h) for h in hits]}


@reads.get("/items/{item_id}")
def get_item(item_id: int, svc: ServiceDep):
    return item_json(svc.retriever.get(item_id))


@reads.get("/items/{item_id}/image")
def get_image(item_id: int, svc: ServiceDep):
    """The image file of this item: resolved by id, and only from the retriever's media folders."""
    path = svc.retriever.image_file(item_id)
    return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")


# ------------------------------------------------------------------------------------------------ writes
writes = APIRouter(dependencies=[Depends(same_origin_write)])


@writes.post("/items")
def add_items(body: AddRequest, svc: ServiceDep):
    """Add vectors or texts (exactly one) with optional metadata and ids; durable when answered."""
    if (body.vectors is None) == (body.texts is None):
        raise HTTPError(422, "send exactly one of 'vectors' or 'texts'")
    r = svc.retriever
    if body.vectors is not None:
        if not body.vectors:
            raise HTTPError(422, "'vectors' is empty")
        vectors = _vectors(body.vectors, r.dim, "vectors")
        ids = r.add(vectors=vectors, metadata=body.metadata, ids=body.ids, modality=body.modality, progress=False)
    else:
        ids = r.add(texts=body.texts, metadata=body.metadata, ids=body.ids, progress=False)
    return {"ids": ids.tolist()}


@writes.post("/items/images")
def add_images(
    svc: ServiceDep,
    files: list[UploadFile] = File(...),
    metadata: str | None = Form(None),
    ids: str | None = Form(None),
):
    """Upload images (multipart field ``files``, repeated) with ``metadata`` (a JSON list of dicts)."""
    meta = _json_form(metadata, "metadata", list)
    id_list = _json_form(ids, "ids", list)
    decoded = [(_read_image(f.file.read(), f.filename or "file"), f) for f in files]
    os.makedirs(svc.media_dir, exist_ok=True)
    paths = []
    for (_, suffix), upload in decoded:
        upload.file.seek(0)
        data = upload.file.read()
        path = os.path.join(svc.media_dir, hashlib.sha256(data).hexdigest() + suffix)
        if not os.path.exists(path):
            atomic_write_bytes(path, data)
        paths.append(path)
    return {"ids": svc.retriever.add(images=paths, metadata=meta, ids=id_list, progress=False).tolist()}


@writes.delete("/items/{item_id}")
def delete_item(item_id: int, svc: ServiceDep):
    return {"removed": svc.retriever.remove([item_id])}


@writes.post("/items/delete")
def delete_items(body: DeleteRequest, svc: ServiceDep):
    return {"removed": svc.retriever.remove(body.ids)}


@writes.post("/save")
def save(svc: ServiceDep):
    """Snapshot the index now (writes are already durable; a snapshot makes the next start faster)."""
    target = svc.save_dir or svc.retriever.directory
    if not target:
        raise HTTPError(409, "this retriever has no directory to save to; start the server with one")
    snapshot = svc.retriever.save(target)
    return {"snapshot": os.path.basename(snapshot), "items": len(svc.retriever)}
