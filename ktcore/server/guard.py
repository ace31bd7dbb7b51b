"""What a request must pass before any route sees it, in one ASGI middleware (``RequestGuard``).

In this order: the ``Host`` header (a DNS-rebinding page reaches 127.0.0.1 under its own name), the ``Origin``
of a browser request (a page from elsewhere may not act on the server, not even with a "simple" request that
skips the CORS preflight), the API key, the content type of a body (JSON routes take JSON), then the body
itself (no lone UTF-16 surrogates, which no encoder can write back). Every refusal is an error in the route's
own schema. A route that raises is answered 500 here, without internal detail and with the connection kept.
The body size limit is checked here too, not with FastAPI's ``max_body_size``: that one answers a declared
oversize body with its own plain-text 413 whatever the route.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import APIError, error_response

log = logging.getLogger("ktcore.server")

PUBLIC_PATHS = ("/health", "/web")  # no API key needed (the page asks for the key itself)
# Pages served from this machine: http(s) on localhost, *.localhost, 127.0.0.1 or [::1], any port.
LOCAL_ORIGIN = r"https?://(localhost|[^/:]+\.localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only a \u escape can carry a lone surrogate in JSON


@dataclass
class AccessPolicy:
    """Who may use the server. ``allow_hosts`` / ``allow_origins`` extend the defaults; ``"*"`` allows any."""

    api_key: str | None = None
    bound_host: str = "127.0.0.1"
    allow_hosts: list[str] = field(default_factory=list)
    allow_origins: list[str] = field(default_factory=list)

    def __post_init__(self):
        machine = socket.gethostname()
        names = {self.bound_host, machine, f"{machine}.local", socket.getfqdn(), *self.allow_hosts}
        self._host_names = {n.lower().strip("[]") for n in names if n}
        self._origins = {o.rstrip("/") for o in self.allow_origins}
        self._local_origin = re.compile(LOCAL_ORIGIN)

    def host_allowed(self, host_header: str) -> bool:
        """IP literals (no DNS name to rebind), localhost names, this machine's names (its mDNS ``.local``
        name too), the bound host and ``allow_hosts``."""
        if "*" in self._host_names:
            return True
        host = urlsplit(f"//{host_header}").hostname or ""
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        return host in ("localhost",) or host.endswith(".localhost") or host in self._host_names

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self._origins or origin in self._origins or bool(self._local_origin.fullmatch(origin))

    def cors_options(self) -> dict:
        """Keyword arguments of Starlette's ``CORSMiddleware`` granting exactly the allowed origins."""
        if "*" in self._origins:
            return {"allow_origins": ["*"]}
        return {"allow_origins": sorted(self._origins), "allow_origin_regex": LOCAL_ORIGIN}


def _is_public(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS)


def _lone_surrogate_path(value) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (``"messages[0].content"``), else None."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((f"{where}.{key}" if where else str(key), key))
                stack.append((f"{where}.{key}" if where else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None


class _TooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app, policy: AccessPolicy, max_body_bytes: int):
        self.app = app
        self.policy = policy
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        refusal = self._check_headers(scope)
        if refusal is not None:
            return await error_response(path, refusal)(scope, receive, send)
        if scope["method"] in _BODY_METHODS:
            try:
                body = await self._read_body(scope, receive)
            except _TooLarge:
                err = APIError(413, f"the request body is larger than the limit of {self.max_body_bytes} bytes "
                                    "(kt serve --max-body-mb)", code="request_too_large")
                return await error_response(path, err)(scope, receive, send)
            if body is None:  # the client went away
                return
            refusal = self._check_body(scope, body)
            if refusal is not None:
                return await error_response(path, refusal)(scope, receive, send)
            receive = _replay(body, receive)

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if started:
                raise  # a response already under way cannot be replaced: let the server close the connection
            err = APIError(500, "internal server error (the server log has the details)", type="server_error")
            await error_response(path, err)(scope, receive, send)

    def _check_headers(self, scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if host is not None and not self.policy.host_allowed(host):
            return APIError(403, f"Host '{host}' is not served here; start the server with --allow-host to add it",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin != f"{scope.get('scheme', 'http')}://{host}" \
                and not self.policy.origin_allowed(origin):
            return APIError(403, f"requests from pages at '{origin}' are not allowed; start the server with "
                                 "--allow-origin to allow them", code="origin_not_allowed")
        if self.policy.api_key and scope["method"] != "OPTIONS" and not _is_public(scope["path"]):
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.policy.api_key}".encode()):
                message = "Incorrect API key provided" if given else \
                    "Missing API key: send 'Authorization: Bearer <key>'"
                return APIError(401, message, code="invalid_api_key")
        return None

    @staticmethod
    def _check_content_type(scope) -> APIError | None:
        """A body must be JSON. ``curl -d '{...}'`` (form-encoded, as Ollama's docs call the API) and bodies
        without a content type are read as JSON too, but only from clients that are not browsers (no
        ``Origin``): a page may send those types without a CORS preflight."""
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        browser = b"origin" in headers
        media = content_type.split(";")[0].strip().lower()
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            return None
        if media in ("", "application/x-www-form-urlencoded") and not browser:
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
            return None
        return APIError(415, f"the request body must be JSON (Content-Type: application/json), got "
                             f"'{content_type or 'none'}'", code="unsupported_media_type")

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, ``None`` when the client goes away; raises ``_TooLarge`` past the limit (at once
        when ``Content-Length`` says so, else once that much has come)."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _TooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_body(self, scope, body: bytes) -> APIError | None:
        if not body:
            return None
        refusal = self._check_content_type(scope)
        if refusal is not None or not _SURROGATE_ESCAPE.search(body):
            return refusal
            return None
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None  # the route reports invalid JSON itself
        where = _lone_surrogate_path(value)
        if where is None:
            return None
        return APIError(400, f"{where}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                             "which is not text", param=where, code="invalid_value")


def _replay(body: bytes, receive):
    """A ``receive`` that hands the buffered body over once, then waits on the connection (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
