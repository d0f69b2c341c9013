"""ASGI guard in front of the HTTP service: Host allow-list, API key, body size limits, security headers.

- **Host allow-list** (DNS rebinding): a page on ``attacker.example`` that re-resolves its name to 127.0.0.1 talks
  to the service with ``Host: attacker.example``; only the bound names (loopback by default) are answered, others
  get 421.
- **API key**: with ``api_key`` every path but the page, its static files, ``/health`` and the schema needs
  ``X-API-Key``.
- **Body limits**: bodies larger than ``max_request_bytes`` (JSON) or ``max_upload_bytes`` (multipart) get 413, by
  ``Content-Length`` before reading and by counting while streaming otherwise.
- **Headers**: every response carries ``X-Content-Type-Options: nosniff``, a same-origin Content-Security-Policy,
  ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``.

Cross-site request forgery is stopped per route by :func:`same_origin_write` (a dependency of the mutating routes).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import Request

from metrank.search.server.errors import HTTPError

PUBLIC_PATHS = ("/", "/health", "/openapi.json", "/favicon.ico")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def host_name(value: str) -> str:
    """The host name of a ``Host`` header or URL netloc, lower-case, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_host_set(bind_host: str, extra: Iterable[str] | None) -> frozenset[str] | None:
    """Loopback names, the bound host (unless a wildcard) and ``extra``; None (everything) if ``extra`` has "*"."""
    extra = list(extra or ())
    if "*" in extra:
        return None
    hosts = set(LOOPBACK_HOSTS) | {host_name(h) for h in extra}
    if bind_host not in WILDCARD_BINDS:
        hosts.add(host_name(bind_host))
    return frozenset(hosts)


class GuardMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_request_bytes: int,
        max_upload_bytes: int,
        allowed_hosts: frozenset[str] | None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            await _reply(
                send_secured,
                421,
                f"host {host!r} is not served here (DNS rebinding protection): start the server with "
                "--allowed-host NAME for each name clients use",
            )
            return
        path = scope["path"]
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get(b"x-api-key", b"")
            if not secrets.compare_digest(given, self.api_key.encode()):
                await _reply(send_secured, 401, "missing or wrong API key: send it in the X-API-Key header")
                return
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.max_upload_bytes if multipart else self.max_request_bytes
        kind = "upload" if multipart else "request body"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send_secured, 400, "invalid Content-Length header")
                return
            if declared > limit:
                await _reply(send_secured, 413, f"{kind} of {declared} bytes exceeds the limit of {limit} bytes")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _reply(send_secured, 413, f"{kind} exceeds the limit of {limit} bytes")
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

        await self.app(scope, replay, send_secured)


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


def same_origin_write(request: Request) -> None:
    """Dependency of every mutating route (CSRF protection): the request must be one a web page on another site
    cannot send without a CORS preflight - a JSON body, a custom ``X-Requested-With`` header or the API key - and
    an ``Origin``, when the browser sends one, must be an allowed host (this service sends no CORS headers, so
    preflights from other origins fail)."""
    headers = request.headers
    origin = headers.get("origin")
    allowed = request.app.state.allowed_hosts
    if origin is not None and (
        origin == "null" or (allowed is not None and host_name(urlsplit(origin).netloc) not in allowed)
    ):
        raise HTTPError(403, f"cross-origin write from {origin!r} refused (CSRF protection)")
    if headers.get("sec-fetch-site") == "cross-site":
        raise HTTPError(403, "cross-site write refused (CSRF protection)")
    json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    if request.method == "DELETE" or json_body or "x-requested-with" in headers or "x-api-key" in headers:
        return
    raise HTTPError(
        403,
        "writes need Content-Type: application/json or an X-Requested-With header (CSRF protection); "
        "multipart uploads: add the header X-Requested-With: metrank",
    )
