"""ASGI middlewares of the service: body limits, stalled and trickled uploads, the token, the Host header,
security headers, and an access log without tokens. Plain ASGI (no framework), so each is tested alone."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

#: headers every response carries: no sniffing, no framing by other sites, no referrer, scripts and styles
#: from this origin only (the page and /docs keep theirs inline), images from here or data:/blob: URLs
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


async def reply(send, status: int, detail: str, *, close: bool = False) -> None:
    """A JSON error response sent straight through ASGI (``{"detail": ...}``, as FastAPI's own)."""
    body = ('{"detail":"' + detail.replace("\\", "\\\\").replace('"', '\\"') + '"}').encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``max_bytes``, decided before it is all read.

    With a Content-Length over the limit the app is never called. Otherwise the body is counted
    as it arrives; at the limit this middleware answers 413 itself, tells the app the client has
    gone (``http.disconnect``, so it stops reading and spools nothing more) and drops whatever the
    app still tries to send.
    """

    def __init__(self, app, max_bytes: int, path_limits: dict | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, dict(path_limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope.get("path"), self.max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await reply(send, 413, f"upload larger than the limit of {limit} bytes", close=True)
        seen, rejected = 0, False

        async def counted_receive():
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    rejected = True
                    await reply(send, 413, f"upload larger than the limit of {limit} bytes", close=True)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not rejected:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


class StallGuard:
    """408 for an upload whose body stops arriving for ``timeout`` seconds, or that takes longer than
    ``total`` seconds in all (a body trickled a byte at a time never stalls, but cannot hold a worker and a
    prediction slot for ever either). Slow headers are :mod:`covidscan.serve.protocol`'s part."""

    def __init__(self, app, timeout: float, total: float | None = None):
        self.app, self.timeout = app, timeout
        self.total = total if total is not None else 4 * timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"stalled": False, "started": False}
        deadline = time.monotonic() + self.total

        async def timed_receive():
            if state["stalled"]:
                return {"type": "http.disconnect"}
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                return await asyncio.wait_for(receive(), min(self.timeout, left))
            except TimeoutError:
                state["stalled"] = True
                if not state["started"]:
                    what = (
                        f"no data for {self.timeout:g} seconds"
                        if left > self.timeout
                        else f"not complete in {self.total:g} seconds"
                    )
                    await reply(send, 408, f"upload stalled: {what}", close=True)
                    state["started"] = True
                return {"type": "http.disconnect"}

        async def guarded_send(message):
            if state["stalled"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


def _token_from(scope) -> tuple[bytes | None, bool]:
    """``(token, malformed)`` from ``Authorization: Bearer T``, the ``covidscan_token`` cookie, or (the page's
    first load only) ``?token=T``."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not value.strip() or not value.strip().isascii():
            return None, True
        return value.strip(), False
    for part in headers.get(b"cookie", b"").split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == b"covidscan_token" and value:
            return value, False
    if scope.get("path") == "/" and scope.get("method") == "GET":
        for part in scope.get("query_string", b"").split(b"&"):
            key, _, value = part.partition(b"=")
            if key == b"token" and value:
                return value, False
    return None, False


class TokenGuard:
    """Every path but ``/health`` needs the token: ``Authorization: Bearer TOKEN``, or the ``covidscan_token``
    cookie the page gets when opened as ``/?token=TOKEN``. A malformed Authorization header is 400, a missing
    or wrong token 401; tokens are compared in constant time, as bytes."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given, malformed = _token_from(scope)
        if malformed:
            return await reply(send, 400, "malformed Authorization header: expected 'Bearer TOKEN' in ASCII")
        if given is None or not hmac.compare_digest(given, self.token):
            return await reply(
                send, 401, "a valid token is needed (Authorization: Bearer TOKEN, or open the page as /?token=TOKEN)"
            )
        if scope.get("path") == "/" and b"token=" in scope.get("query_string", b""):

            async def with_cookie(message):  # the page's later requests carry the token as a cookie, not in URLs
                if message["type"] == "http.response.start":
                    cookie = b"covidscan_token=" + self.token + b"; HttpOnly; SameSite=Strict; Path=/"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
                await send(message)

            return await self.app(scope, receive, with_cookie)
        await self.app(scope, receive, send)


class HostGuard:
    """421 for a request whose Host header names none of ``allowed`` (any port): a page on
    another site that rebinds its DNS name to 127.0.0.1 sends its own name, so it cannot read a token-less
    local service."""

    def __init__(self, app, allowed: tuple[str, ...] = LOCAL_HOSTS):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
        name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":", 1)[0]
        if name not in self.allowed:
            return await reply(send, 421, f"Host {host!r} is not served here (allowed: {', '.join(sorted(self.allowed))})")
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response the app sends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class QuerylessAccessLog(logging.Filter):
    """Drops the query string from uvicorn's access-log lines (a ``?token=`` never reaches a log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            args = list(record.args)
            args[2] = args[2].split("?", 1)[0]
            record.args = tuple(args)
        return True


def quiet_tokens_in_access_log() -> None:
    """Install :class:`QuerylessAccessLog` on uvicorn's access logger (once)."""
    log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuerylessAccessLog) for f in log.filters):
        log.addFilter(QuerylessAccessLog())
