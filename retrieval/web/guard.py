"""The server's guard, an ASGI middleware around everything (pages, API, /static, /docs, 404s).

With no token only loopback Host headers are answered (a web page elsewhere cannot DNS-rebind its
way in); with a token every request must carry it (``Authorization: Bearer``, the
``X-Facefind-Token`` header, ``?token=`` which also sets an HttpOnly cookie, or that cookie) or
gets 401. Request bodies are capped at ``MAX_UPLOAD`` (413, counted while reading, whether or not
Content-Length is sent; the refused body is drained up to ``DRAIN_LIMIT`` first, so that clients
that send it all before reading still read the 413). Every answer carries the security headers; the two pages carry the CSP.

Why not route dependencies: they never see /static, /docs, /openapi.json or an unknown path, and
the body cap must act before the form parser spools an upload. Why not Starlette's
``TrustedHostMiddleware`` for the Host check: its refusal is a fixed ``400 text/plain "Invalid
host header"`` (hard-coded in its ``__call__``), where ours is a 403 one-line JSON error that says
to start the server with --token, and it matches exact names only (loopback is 127.0.0.0/8 and ::1).
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facefind.retrieval.web.server import is_loopback

MAX_UPLOAD = 20 * 1024 * 1024   # bytes of a request body (the photo plus multipart framing)
DRAIN_LIMIT = 64 * 1024 * 1024  # bytes of a refused body read and dropped so that the 413 is heard
TOKEN_COOKIE = "facefind_token"
HTML_PATHS = ("/", "/model")
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY")]
NOT_LOCAL = ("this server answers only requests addressed to localhost; start it with --token to serve "
             "other hosts")
NO_TOKEN = ("this server needs its token: open the URL `facefind serve` printed (it ends in ?token=...), "
            "or send 'Authorization: Bearer TOKEN'")


def too_large(limit: int) -> str:
    return f"the upload is larger than {limit >> 20} MB: send a smaller photo (a face needs far less)"


class Guard:
    """ASGI middleware: Host/token checks, the request body cap, and security headers."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int = MAX_UPLOAD) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        set_cookie = None
        if self.token is None:
            if not is_loopback(_host_of(conn.headers.get("host", ""))):
                await _refuse(scope, receive, send, 403, NOT_LOCAL)
                return
        else:
            given, set_cookie = _token_of(conn)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _refuse(scope, receive, send, 401, NO_TOKEN)
                return
        declared = conn.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            # A client that asked before sending (Expect: 100-continue) hears no 100 (the server sends
            # it only once the app reads) and reads this at once; any other gets it after its body
            # is read and dropped, up to DRAIN_LIMIT: a client that writes the whole body before
            # reading (urllib, requests) would otherwise meet a closed socket instead of the 413.
            if "100-continue" not in conn.headers.get("expect", "").lower() and declared.isdigit() \
                    and int(declared) <= DRAIN_LIMIT:
                await _drain(receive, DRAIN_LIMIT)
            await _refuse(scope, receive, send, 413, too_large(self.max_body))
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, ok, ended = await self._read_body(receive)
            if not ok:
                if not ended:  # the rest of a body sent without a length
                    await _drain(receive, DRAIN_LIMIT - self.max_body)
                await _refuse(scope, receive, send, 413, too_large(self.max_body))
                return
            receive = _replay(body)
        extra = list(SECURITY_HEADERS)
        if scope["path"] in HTML_PATHS:
            extra.append((b"content-security-policy", CSP.encode()))
        if set_cookie:
            extra.append((b"set-cookie", set_cookie.encode()))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool, bool]:
        """(body, within the cap, the body has ended)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False, True
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body:
                return b"", False, not more
            chunks.append(chunk)
            if not more:
                return b"".join(chunks), True, True


def _host_of(header: str) -> str:
    """The host of a Host header: ``[::1]:8000`` -> ``[::1]``, ``localhost:8000`` -> ``localhost``."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _token_of(conn: HTTPConnection) -> tuple[str | None, str | None]:
    """The token the request carries, and a cookie to set when it came in the URL."""
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), None
    if "x-facefind-token" in conn.headers:
        return conn.headers["x-facefind-token"], None
    in_url = conn.query_params.get("token")
    if in_url:
        return in_url, f"{TOKEN_COOKIE}={in_url}; Path=/; HttpOnly; SameSite=Strict"
    return conn.cookies.get(TOKEN_COOKIE), None


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a request body, up to ``limit`` bytes (then the server may close)."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """A one-line JSON error, sent before the app sees the request."""
    response = JSONResponse({"error": message}, status, headers={"x-content-type-options": "nosniff"})
    await response(scope, receive, send)
