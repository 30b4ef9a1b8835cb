"""What keeps the service usable by its owner only: checks that run on every request and connection,
before any route. Pure ASGI (no FastAPI), so they run in the order written here:

    connection   at most `max_connections` open: above it the connection idle the longest is closed (or,
                 when all are mid-request, the new one gets a bare 503), so no file descriptors pile up
                 and idle sockets cannot lock out /health; one that sends no request head within
                 `header_timeout_s` is closed
    Host         an IP literal, a localhost name or an `allowed_hosts` name; else 400 (DNS rebinding)
    Origin       absent, the server's own, or in `allowed_origins`; else 403 (cross-site pages)
    API key      with a key, every path but /health, / and /static/ needs it (the API docs included); else 401
    body         at most `max_uploads` bodies read at once (others wait up to UPLOAD_WAIT_S, then 503 +
                 Retry-After), each at most the upload
                 limit (413, counted while streaming) and read within `body_timeout_s` (408)
    headers      nosniff, no referrer, no framing, on every response

Refused clients are logged one line per kind at most every `LOG_EVERY_S` seconds, with the count since.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .requests import FORM_OVERHEAD_BYTES, ServerSettings

log = logging.getLogger("sdx4.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOG_EVERY_S = 10.0
#: Paths that need no API key: the health check and the web page with its assets (the page asks for the key).
OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
LOCAL_NAMES = ("localhost",)
#: Added to every response that does not set its own; the page sets its stricter CSP itself.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
}
UPLOAD_RETRY_AFTER_S = 5
#: How long a request waits for one of the `max_uploads` slots before its 503, and how often it looks.
UPLOAD_WAIT_S, UPLOAD_POLL_S = 2.0, 0.02
KEY_MESSAGE = "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


class RateLimitedLog:
    """One warning per kind at most every `every_s` seconds, saying how many were not logged in between."""

    def __init__(self, logger: logging.Logger = log, every_s: float = LOG_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every_s) < self.every_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return False
        quiet = self._quiet.pop(kind, 0)
        self._last[kind] = now
        self.logger.warning("%s%s", message, f" ({quiet} more like it not logged)" if quiet else "")
        return True


class RefusalLogFilter(logging.Filter):
    """For uvicorn's access log: a refusal (400, 401, 403, 408, 413, 429, 503) is logged once per status
    every `every_s` seconds, so a flood of refused requests cannot fill the log; every other line passes."""

    REFUSALS = frozenset({400, 401, 403, 408, 413, 429, 503})

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[int, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        status = args[4] if len(args) >= 5 and isinstance(args[4], int) else None  # uvicorn: client, method, path, version, status
        if status not in self.REFUSALS:
            return True
        now = time.monotonic()
        if now - self._last.get(status, -self.every_s) < self.every_s:
            return False
        self._last[status] = now
        return True


def quiet_access_log(logger: logging.Logger | None = None) -> RefusalLogFilter:
    """Put one RefusalLogFilter on uvicorn's access logger (replacing an earlier one)."""
    logger = logger or logging.getLogger("uvicorn.access")
    for old in [f for f in logger.filters if isinstance(f, RefusalLogFilter)]:
        logger.removeFilter(old)
    new = RefusalLogFilter()
    logger.addFilter(new)
    return new


def host_name(host_header: str) -> str:
    """'Example.com:7860' -> 'example.com', '[::1]:7860' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """IP literals and localhost names always (a rebinding page cannot send them for its own origin),
    other names only when listed (`*` allows any)."""
    if not host_header:
        return False
    name = host_name(host_header).rstrip(".")
    if "*" in allowed or name in LOCAL_NAMES or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def origin_allowed(origin: str, scheme: str, host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """The server's own origin (its host and port are the Host header's: the scheme may differ behind a
    TLS proxy), or one listed in `allowed` (`*` allows any). "null" (sandboxed frames, files) is never own."""
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    own_scheme, sep, netloc = origin.partition("://")
    return bool(sep) and own_scheme in ("http", "https", scheme) and host_header is not None and netloc == host_header.strip().lower()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _json(send: Send, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail, "field": field}).encode()
    hdrs = {"content-type": "application/json", "content-length": str(len(body)), **SECURITY_HEADERS,
            **{k.lower(): v for k, v in (headers or {}).items()}}
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()]})
    await send({"type": "http.response.body", "body": body})


class BodyRefused(Exception):
    """Raised from `receive` when a body is too large or too slow; turned into the 413/408 answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Guard:
    """The ASGI middleware: Host, Origin, API key, body limits and security headers (module docstring)."""

    def __init__(self, app: Any, settings: ServerSettings, say: RateLimitedLog | None = None) -> None:
        self.app, self.settings = app, settings
        self.say = say or RateLimitedLog()
        self.allowed_hosts = tuple(h.lower().rstrip(".") for h in settings.allowed_hosts)
        self.allowed_origins = tuple(o.lower().rstrip("/") for o in settings.allowed_origins)
        self.uploads = 0  # bodies being read now (the event loop's thread only)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        client = (scope.get("client") or ("?", 0))[0]
        host = headers.get("host")
        if not host_allowed(host, self.allowed_hosts):
            self.say("host", f"refused a request from {client} for Host {host!r} (allow it with --allowed-host)")
            await _json(send, 400, f"Host {host!r} is not this server's; allowed: IP addresses, localhost"
                        + "".join(f", {h}" for h in self.allowed_hosts) + " (sdx4 serve --allowed-host NAME)", "host")
            return
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, scope.get("scheme", "http"), host, self.allowed_origins):
            self.say("origin", f"refused a request from {client} with Origin {origin!r} (allow it with --allow-origin)")
            await _json(send, 403, f"cross-site request refused: Origin {origin!r} is not this server's "
                        "(sdx4 serve --allow-origin ORIGIN)", "origin")
            return
        path = scope.get("path", "")
        if self.settings.api_key is not None and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            if not self._key_ok(headers):
                await _json(send, 401, KEY_MESSAGE, headers={"WWW-Authenticate": "Bearer"})
                return

        send = self._with_headers(send)
        if not self._has_body(scope, headers):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = headers.get("content-length", "")
        too_big = f"upload is over the limit of {self.settings.max_upload_bytes} bytes"
        if declared.isdigit() and int(declared) > limit:
            await _json(send, 413, too_big, "image", {"Connection": "close"})
            return
        # Wait a little for a free slot (a burst of small uploads passes), then refuse. A waiting body
        # stays in the socket: uvicorn stops reading a connection whose buffer is full.
        give_up = time.monotonic() + UPLOAD_WAIT_S
        while self.uploads >= self.settings.max_uploads:
            if time.monotonic() > give_up:
                self.say("uploads", f"refused an upload from {client}: {self.uploads} being read, the limit is {self.settings.max_uploads}")
                await _json(send, 503, f"too many uploads at once (the limit is {self.settings.max_uploads}); retry shortly",
                            headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S), "Connection": "close"})
                return
            await asyncio.sleep(UPLOAD_POLL_S)
        self.uploads += 1
        reading = True
        started = False
        deadline = time.monotonic() + self.settings.body_timeout_s
        received = 0

        def done_reading() -> None:
            nonlocal reading
            if reading:
                reading = False
                self.uploads -= 1

        async def timed_receive() -> Message:
            nonlocal received
            if not reading:  # the body is read; later receives wait for the disconnect, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                done_reading()
                self.say("slow", f"cut off a slow upload from {client}: {received} bytes in {self.settings.body_timeout_s:g} s")
                raise BodyRefused(408, f"the request body was not received within {self.settings.body_timeout_s:g} s "
                                  f"({received} bytes arrived)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    done_reading()
                    raise BodyRefused(413, too_big)
                if not message.get("more_body", False):
                    done_reading()
            else:
                done_reading()
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, watch_send)
        except BodyRefused as e:
            if not started:
                await _json(send, e.status, e.detail, "image", {"Connection": "close"})
        finally:
            done_reading()

    def _key_ok(self, headers: dict[str, str]) -> bool:
        key = self.settings.api_key or ""
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and secrets.compare_digest(given.encode(), key.encode())

    @staticmethod
    def _has_body(scope: Scope, headers: dict[str, str]) -> bool:
        length = headers.get("content-length", "")
        return "transfer-encoding" in headers or (length not in ("", "0")) or scope.get("method") in ("POST", "PUT", "PATCH")

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_headers


def guarded_protocol(settings: ServerSettings, say: RateLimitedLog) -> type:
    """uvicorn's h11 protocol with two limits it lacks: open connections (above `max_connections` the
    longest-idle one is closed, else the new one) and the time to send a request head (uvicorn only
    times out idle connections AFTER a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _opened = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = self.loop.time()
            if len(self.connections) > settings.max_connections:
                # Make room by closing the connection idle the longest (no request, or between
                # requests); a flood of idle sockets then cannot lock out /health. If every other
                # connection is mid-request (bounded by the body and upload limits), refuse this one.
                idle = [c for c in self.connections if c is not self and getattr(c, "_is_idle", lambda: False)()]
                if idle:
                    victim = min(idle, key=lambda c: c._opened)
                    say("connections", f"closed the oldest idle connection, from {(victim.client or ('?',))[0]}: "
                        f"{len(self.connections) - 1} open, the limit is {settings.max_connections}")
                    victim.transport.close()
                else:
                    say("connections", f"refused a connection from {(self.client or ('?',))[0]}: "
                        f"{len(self.connections) - 1} busy, the limit is {settings.max_connections}")
                    transport.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    transport.close()
                    return
            self._head_timer = self.loop.call_later(settings.header_timeout_s, self._head_timeout)

        def _is_idle(self) -> bool:
            return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is None and not self.transport.is_closing():
                say("idle", f"closed a connection from {(self.client or ('?',))[0]} that sent no request "
                    f"within {settings.header_timeout_s:g} s")
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return GuardedH11
