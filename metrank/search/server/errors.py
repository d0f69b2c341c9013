"""HTTP error answers: ``HTTPError`` for the service's own checks, ``MetrankError`` mapped to 4xx
(``NotFoundError``/``MissingFileError`` -> 404, every other ``MetrankError`` -> 400), validation errors -> 422.
Anything else is a bug and stays a 500 without details. Messages never show server paths: absolute paths are cut
to their last component."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from metrank.errors import MetrankError, MissingFileError, NotFoundError

_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)+(?=[^\s'\"/]*)")


class HTTPError(Exception):
    """An error with an HTTP status, turned into ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def redact_paths(message: str) -> str:
    """``"cannot read /srv/data/model.pt"`` -> ``"cannot read model.pt"``."""
    return _ABSOLUTE_PATH.sub("", message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return JSONResponse({"detail": redact_paths(err.detail)}, status_code=err.status)

    @app.exception_handler(MetrankError)
    async def _metrank_error(request: Request, err: MetrankError):
        status = 404 if isinstance(err, (NotFoundError, MissingFileError)) else 400
        return JSONResponse({"detail": redact_paths(str(err))}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        reasons = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"detail": redact_paths(f"malformed request: {reasons}")}, status_code=422)
