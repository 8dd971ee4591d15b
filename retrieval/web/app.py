"""`facefind serve`'s HTTP layer: a FastAPI app over one long-lived ``Engine``.

Every endpoint is a thin wrapper around the library calls the CLI makes (``Engine.query``,
``Result.to_dict``, ``Engine.same_file``, ``Engine.evaluate_quality``, the indexer's reader, the index's own
checkpoint, ``facefind.indexer.faces.detect.identity_of`` for identity), so the page and ``facefind query --json`` can never
disagree. ``by=look|person`` is the CLI's ``--by``: rank by the model's embedding, or by dlib
identity distance (an index built with ``index --identity``; hits then carry ``distance`` and
``same_person``). JSON is serialised once by orjson (no per-field encoder walk) and each query
answer carries a ``Server-Timing: engine;dur=MS`` header with the engine's own time.

Safety (see ``Guard``): with no token only loopback Host headers are accepted (a web page
elsewhere cannot DNS-rebind its way in); with a token every request must carry it (header,
cookie or ``?token=``) or gets 401. Request bodies are capped at ``MAX_UPLOAD`` (413, counted
while reading, whether or not Content-Length is sent). Files are looked up by catalog id only.
Errors are one-line JSON ``{"error": ...}`` (plus ``position`` for a bad expression); nothing
returns a traceback, and no endpoint writes to the index (the thumbnail cache is a separate
folder of derived files).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hmac
import io
import json
import logging
import math
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

import numpy as np
import orjson
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from facefind.db.errors import CatalogError, FacefindError, ImageError, QuerySyntaxError
from facefind.retrieval.engine import NO_IDENTITY
from facefind.retrieval.web.live import FixedIndex, Live, LiveIndex, Source
from facefind.retrieval.web.thumbs import SourceGone, ThumbnailCache, default_cache_folder, identity

if TYPE_CHECKING:
    from facefind.retrieval.engine import Engine, Result

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 20 * 1024 * 1024   # bytes of a request body (the photo plus multipart framing)
MAX_LIMIT = 1000                # hits per page; /api/export streams everything
EXPORT_PAGE = 2000              # hits per engine call while exporting
TOKEN_COOKIE = "facefind_token"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
          ".bmp": "image/bmp", ".gif": "image/gif"}


class ApiError(Exception):
    """An HTTP error with a one-line message (and optional extra JSON fields)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``obj`` as compact JSON, serialised once by orjson.

    A page of 60 hits holds 2,400 probabilities: the stdlib's json took 1.5-9 ms for them on the
    2-core machine (more than the engine's query), orjson 0.05 ms, with the same shortest
    round-trip digits.
    """
    body = orjson.dumps(obj, default=_json_default)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _error(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


# ------------------------------------------------------------------------------------ the guard


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind or a Host header's host) is this machine only."""
    import ipaddress

    host = host.strip().lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host/token checks, the request body cap, and security headers."""

    def __init__(self, app: Any, token: str | None, max_body: int = MAX_UPLOAD) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        set_cookie = None
        if self.token is None:
            if not is_loopback(_host_of(headers.get("host", ""))):
                await _send_error(send, 403, "this server answers only requests addressed to localhost; "
                                  "start it with --token to serve other hosts")
                return
        else:
            given, set_cookie = self._token_of(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await _send_error(send, 401, "this server needs its token: open the URL `facefind serve` "
                                  "printed (it ends in ?token=...), or send 'Authorization: Bearer TOKEN'")
                return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _send_error(send, 413, _too_large(self.max_body))
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, ok = await self._read_body(receive)
            if not ok:
                await _send_error(send, 413, _too_large(self.max_body))
                return
            receive = _replay(body)
        html = scope["path"] in ("/", "/model")

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY")]
                if html:
                    extra.append((b"content-security-policy", _CSP.encode()))
                if set_cookie:
                    extra.append((b"set-cookie", set_cookie.encode()))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _token_of(self, scope: dict, headers: dict[str, str]) -> tuple[str | None, str | None]:
        """The token the request carries, and a cookie to set when it came in the URL."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), None
        if "x-facefind-token" in headers:
            return headers["x-facefind-token"], None
        from urllib.parse import parse_qs

        in_url = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if in_url:
            cookie = f"{TOKEN_COOKIE}={in_url[0]}; Path=/; HttpOnly; SameSite=Strict"
            return in_url[0], cookie
        from http.cookies import CookieError, SimpleCookie

        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except CookieError:
            return None, None
        morsel = jar.get(TOKEN_COOKIE)
        return (morsel.value if morsel is not None else None), None

    async def _read_body(self, receive: Callable) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True


def _too_large(limit: int) -> str:
    return f"the upload is larger than {limit >> 20} MB: send a smaller photo (a face needs far less)"


def _replay(body: bytes) -> Callable:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_error(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------ helpers


def _parse_id(raw: str) -> int:
    """A catalog id from a URL segment: plain decimal digits only, else 404 (nothing names a file)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, f"no image with id {raw[:40]!r}: ids are the numbers /api/query returns")
    return int(raw)


# What ``like=`` holds for each ``by``: the field of /api/similar's reference, and its dtype. An
# identity descriptor travels as float32, so a person search paged through /api/query measures the
# very distances (and same_person marks at 0.6) of its first page.
_LIKE = {"look": ("embedding", "<f2"), "person": ("descriptor", "<f4")}


def _reference(raw: str | None, dim: int, by: str = "look") -> np.ndarray | None:
    """A ``like=`` reference: base64url of the values /api/similar returned (see ``_LIKE``)."""
    if not raw:
        return None
    field, dtype = _LIKE[by]
    size = np.dtype(dtype).itemsize
    hint = f"pass the '{field}' that /api/similar returned" + (" with by=person" if by == "person" else "")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(400, f"like= is not base64: {hint}") from None
    if len(data) != size * dim:
        what = "identity descriptors" if by == "person" else "embeddings"
        raise ApiError(400, f"like= holds {len(data) / size:g} values but this index's {what} have {dim}: "
                       f"{hint} for this index")
    vec = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vec)):
        raise ApiError(400, "like= holds values that are not finite numbers")
    return vec


def encode_reference(vec: np.ndarray, by: str = "look") -> str:
    """The inverse of ``_reference``: base64url (no padding) of the values in ``by``'s dtype."""
    return base64.urlsafe_b64encode(np.asarray(vec, dtype=_LIKE[by][1]).tobytes()).decode().rstrip("=")


def _by(raw: str) -> str:
    """``by=``: 'look' or 'person' (any case), as the CLI's ``--by``; a one-line 400 otherwise."""
    choice = raw.strip().lower()
    if choice not in _LIKE:
        raise ApiError(400, f"by must be look or person, not {raw[:40]!r}")
    return choice


def _ranking(eng: Engine, by: str, like: str | None, like_id: int | None) -> dict[str, Any]:
    """``Engine.query``'s reference arguments for ``by`` and a ``like``/``like_id`` reference."""
    if like is not None and like_id is not None:
        raise ApiError(400, "give like or like_id, not both")
    if _by(by) == "look":
        return {"like": _reference(like, eng.emb.shape[1]), "like_id": like_id}
    if not like and like_id is None:
        raise ApiError(400, "by=person ranks by likeness to a face: give like_id (an indexed image) or "
                       "like (the 'descriptor' of a photo, from /api/similar with by=person)")
    _require_identity(eng)
    return {"person": _reference(like, eng.identity.shape[1], "person"), "person_id": like_id}


def _require_identity(eng: Engine) -> None:
    if eng.identity is None:
        raise CatalogError(NO_IDENTITY)


def _clean_name(name: str | None) -> str:
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:120]
    return base or "upload"


def _expr(q: str | None) -> str | None:
    return q if q is not None and q.strip() else None


def _timing(seconds: float) -> dict[str, str]:
    return {"Server-Timing": f"engine;dur={seconds * 1e3:.3f}"}


# ------------------------------------------------------------------------------------ uploads


class Embedder:
    """The index's own checkpoint, loaded on the first upload and kept (one inference at a time)."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._lock = threading.Lock()
        self._predictor: Any = None
        self._sha: str | None = None

    def embed(self, live: Live, data: bytes, name: str, detect_face: bool | None) -> tuple[np.ndarray, list[int] | None]:
        """(unit embedding, face box or None) of an uploaded photo; ImageError with predict's reason."""
        if live.opened is None:
            raise FacefindError("this server has no model to embed photos with (an in-memory index)")
        rgb = _decode(data, name)
        with self._lock:
            predictor = self._load(live)
            pred = predictor.predict_images([rgb], [name], detect_face)[0]
        return pred.embedding, list(pred.face_box) if pred.face_box is not None else None

    def describe(self, data: bytes, name: str) -> np.ndarray:
        """The identity descriptor of an uploaded photo's largest face (``facefind.indexer.faces.detect.identity_of``, what the
        CLI's ``--by person`` computes; dlib, no torch); ImageError when no face is found."""
        from facefind.indexer.faces.detect import identity_of

        rgb = _decode(data, name)
        with self._lock:  # dlib's detector and models are shared: one photo at a time
            found = identity_of(rgb)
        if found is None:
            raise ImageError(f"no face found in {name}: by=person needs a clearly visible face "
                             "(rank by look to compare whole images)")
        return found

    def _load(self, live: Live) -> Any:
        from facefind.retrieval.index import open_predictor

        path = live.opened.checkpoint()  # verified against the snapshot's sha256
        sha = live.engine.snapshot.sha256 or str(path)
        if self._predictor is None or self._sha != sha:
            self._predictor = open_predictor(path, self.device)
            self._sha = sha
        return self._predictor


def _decode(data: bytes, name: str) -> np.ndarray:
    """An upload's RGB pixels, decoded as the indexer does; ImageError with predict's reason."""
    from facefind.trainer.decode import Unreadable, decode_rgb

    try:
        return decode_rgb(data)
    except Unreadable as err:  # the reason `facefind predict` gives for the same bytes
        raise ImageError(f"cannot read image {name}: {err}") from None


# ------------------------------------------------------------------------------------ the app


def create_app(index_dir: Path | None = None, *, source: Source | None = None, token: str | None = None,
               thumbs_dir: Path | None = None, device: str = "auto", check_every: float = 1.0) -> FastAPI:
    """The facefind web app over ``index_dir`` (default: the default index), or over ``source``.

    Opens the index now, so a missing or empty one fails here with its one-line CatalogError.
    """
    if source is None:
        from facefind.db.paths import default_index_dir

        folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
        source = LiveIndex(folder, check_every=check_every)
        index_dir = folder
    thumbs = ThumbnailCache(thumbs_dir or default_cache_folder(index_dir))
    embedder = Embedder(device)
    model_cache: dict[str, Any] = {}

    app = FastAPI(title="facefind", version="0.1.0",
                  description="Search faces by attributes and by example. The JSON shapes are those of "
                              "`facefind query --json`.")
    app.state.source = source
    app.state.thumbs = thumbs
    app.add_middleware(Guard, token=token)

    # -- errors: one line of JSON, never a traceback ------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> Response:
        return _error(err.status, err.message, **err.extra)

    @app.exception_handler(QuerySyntaxError)
    async def _syntax(_: Request, err: QuerySyntaxError) -> Response:
        return _error(400, err.message, position=err.position, expression=err.expression)

    @app.exception_handler(FacefindError)
    async def _facefind(_: Request, err: FacefindError) -> Response:
        return _error(400, str(err).splitlines()[0] if str(err) else type(err).__name__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(400, f"bad {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> Response:
        message = err.detail if isinstance(err.detail, str) else "request refused"
        return _error(err.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> Response:
        log.exception("internal error")
        return _error(500, "internal error (the server log has the details); the server keeps serving")

    # -- the page --------------------------------------------------------------------------------

    def _page(name: str) -> Response:
        return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return _page("index.html")

    @app.get("/model", include_in_schema=False)
    def model_page() -> Response:
        return _page("model.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- JSON API --------------------------------------------------------------------------------

    @app.get("/api/attributes", summary="Attribute names, calibrated thresholds and positive rates")
    def attributes() -> Response:
        live = source.current()
        eng = live.engine
        rates = live_cache(live, "rates", lambda: (eng.probs >= eng.thresholds[:, None]).mean(axis=1))
        labels = live.labels
        label_rates = labels.matrix.mean(axis=0) if labels is not None else None
        return json_response({
            "n_indexed": len(eng), "has_labels": labels is not None, "has_identity": eng.identity is not None,
            "default_thresholds": eng.default_thresholds, "threshold_sets": sorted(eng.threshold_sets),
            "attributes": [
                {"name": name, "threshold": float(eng.thresholds[k]),
                 "thresholds": {s: float(t[k]) for s, t in eng.threshold_sets.items()},
                 "positive_rate": float(rates[k]),
                 "label_rate": float(label_rates[k]) if label_rates is not None else None}
                for k, name in enumerate(eng.attributes)],
        })

    # The query runs on the event loop itself: on the shared 2-core machine, handing it to a worker
    # thread cost ~10 ms per request of waiting for a core (HTTP - engine p50 13 ms vs 1.4 ms
    # inline), more than filter + rank take. Thumbnails, files, uploads and exports stay on threads.
    @app.get("/api/query", summary="Filter by an expression and rank: the shape of `facefind query --json`")
    async def query(
        q: Annotated[str | None, Query(description='Expression, e.g. "Eyeglasses and not Male"; empty: all')] = None,
        limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 60,
        offset: Annotated[int, Query(ge=0)] = 0,
        like_id: Annotated[int | None, Query(ge=0, le=2**62, description="Rank by similarity to this indexed image")] = None,
        like: Annotated[str | None, Query(description="Rank by similarity to this embedding (from /api/similar)")] = None,
        by: Annotated[str, Query(description="look: rank by the model's embedding; person: by identity "
                                 "distance (needs `index --identity`), as `query --by`")] = "look",
        with_quality: Annotated[bool, Query(alias="eval", description="Add `--eval`'s quality block when the "
                                            "index holds labels")] = True,
        thresholds: Annotated[str | None, Query(description="Threshold set bare names use: f1 | accuracy "
                                                "(default: the index's), as `query --thresholds`")] = None,
    ) -> Response:
        live = source.current()
        eng = live.engine
        ref = _ranking(eng, by, like, like_id)
        start = time.perf_counter()
        result = _run_query(eng, _expr(q), limit=limit, offset=offset, thresholds=thresholds, **ref)
        took = time.perf_counter() - start
        out = result.to_dict()
        if with_quality:
            quality = live.quality(result)
            if quality is not None:
                out["quality"] = quality.to_dict()
        return json_response(out, headers=_timing(took))

    @app.post("/api/similar", summary="Search by an uploaded photo (multipart field 'file'), optionally filtered")
    def similar(
        file: Annotated[UploadFile, File(description="A face photo or an aligned crop (at most 20 MB)")],
        q: Annotated[str | None, Form()] = None,
        limit: Annotated[int, Form(ge=0, le=MAX_LIMIT)] = 60,
        detect_face: Annotated[str, Form(description="auto | true | false, as `similar --detect-face`")] = "auto",
        thresholds: Annotated[str | None, Form(description="f1 | accuracy (default: the index's)")] = None,
        by: Annotated[str, Form(description="look | person, as `similar --by`: person ranks by identity "
                                "distance to the photo's largest face (needs `index --identity`)")] = "look",
    ) -> Response:
        live = source.current()
        eng = live.engine
        how = _by(by)
        if how == "person":
            _require_identity(eng)  # before anything is read or loaded
        expr = _expr(q)
        if expr is not None:
            eng.parse(expr)  # a typo fails before the model loads
        eng.threshold_set(thresholds)  # so does an unknown threshold set
        choice = {"auto": None, "true": True, "false": False}.get(detect_face.lower(), "bad")
        if choice == "bad":
            raise ApiError(400, "detect_face must be auto, true or false")
        name = _clean_name(file.filename)
        try:
            data = file.file.read(MAX_UPLOAD + 1)
        finally:
            file.file.close()
        if len(data) > MAX_UPLOAD:
            raise ApiError(413, _too_large(MAX_UPLOAD))
        if how == "person":
            vec = embedder.describe(data, name)
            ref = {"name": name, "descriptor": encode_reference(vec, "person")}
        else:
            vec, box = embedder.embed(live, data, name, choice)  # type: ignore[arg-type]
            ref = {"name": name, "embedding": encode_reference(vec), "face_box": box}
        del data
        start = time.perf_counter()
        result = _run_query(eng, expr, limit=limit, offset=0, thresholds=thresholds,
                            **({"person": vec} if how == "person" else {"like": vec}))
        took = time.perf_counter() - start
        out = result.to_dict()
        out["reference"] = ref
        return json_response(out, headers=_timing(took))

    @app.get("/api/images/{image_id}", summary="One entry: path, face and box, probabilities, matched "
             "literals, labels, and every face of the same file")
    def image(image_id: str, q: Annotated[str | None, Query()] = None,
              thresholds: Annotated[str | None, Query(description="f1 | accuracy (default: the index's)")] = None,
              ) -> Response:
        live = source.current()
        eng = live.engine
        node = eng.parse(q) if _expr(q) is not None else None
        used = eng.threshold_set(thresholds)
        try:
            hit = eng.describe(_parse_id(image_id), node, used)
            same = eng.same_file(hit.id)
        except CatalogError:
            raise ApiError(404, f"no image with id {image_id} in the index") from None
        out = hit.to_dict()
        # The photo view: every face of this entry's file, by face number (a whole-file entry: itself).
        out["faces"] = [{"id": i, "face": face, "box": None if box is None else list(box)} for i, face, box in same]
        del out["score"]
        out["threshold_set"] = used
        out["thresholds"] = dict(zip(eng.attributes, eng.threshold_sets[used].tolist()))
        out["present"] = [a for a, p in hit.attributes.items() if p >= out["thresholds"][a]]
        labels = live.labels
        out["labels"] = labels.of(hit.id) if labels is not None else None
        return json_response(out)

    def _entry(live: Live, image_id: str) -> tuple[str, tuple[int, int, int, int] | None]:
        """The file of an indexed id and its face's box (None: the entry is the whole file)."""
        eng = live.engine
        pos, found = eng.positions(np.array([_parse_id(image_id)]))
        if not found[0]:
            raise ApiError(404, f"no image with id {image_id} in the index")
        return eng.snapshot.paths[int(pos[0])], eng.snapshot.face(int(pos[0]))[1]

    def _path_of(live: Live, image_id: str) -> str:
        return _entry(live, image_id)[0]

    @app.get("/api/images/{image_id}/thumb", summary="A small JPEG of the face (a photo's face: cut out), made once and cached")
    def thumb(image_id: str, request: Request) -> Response:
        path, box = _entry(source.current(), image_id)
        try:
            t = thumbs.get(path, box)
        except SourceGone as err:
            raise ApiError(404, f"image {image_id} cannot be shown: {err}") from None
        etag = f'"{t.etag}"'
        headers = {"Cache-Control": "private, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if t.path is not None:
            return FileResponse(t.path, media_type="image/jpeg", headers=headers)
        return Response(t.data, media_type="image/jpeg", headers=headers)

    @app.get("/api/images/{image_id}/full", summary="The image file itself, as the catalog holds it")
    def full(image_id: str) -> Response:
        path = _path_of(source.current(), image_id)
        try:
            identity(path)
        except SourceGone as err:
            raise ApiError(404, f"image {image_id} cannot be shown: {err}") from None
        media = _MEDIA.get(Path(path).suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"},
                            content_disposition_type="inline")

    @app.get("/api/info", summary="The index, its snapshot and model, and this server")
    def info() -> Response:
        live = source.current()
        eng = live.engine
        out = source.describe()
        out.update({"n_indexed": len(eng), "attributes": len(eng.attributes),
                    "embedding_dim": int(eng.emb.shape[1]), "has_labels": live.labels is not None,
                    "has_identity": eng.identity is not None,
                    "identities": int(eng.has_identity.sum()) if eng.has_identity is not None else 0,
                    "token_required": token is not None, "thumbnails": str(thumbs.folder),
                    "max_upload_bytes": MAX_UPLOAD})
        if live.opened is not None:
            model = live_cache(live, "model_record",
                               lambda: live.opened.catalog.get_model(eng.snapshot.model_id))
            meta = model.meta or {}
            val = meta.get("val_metrics") or {}
            out["model"] = {"id": model.id, "arch": model.arch, "checkpoint": model.checkpoint,
                            "sha256": model.sha256, "img_size": meta.get("img_size"),
                            "epoch": meta.get("epoch"), "created": meta.get("created"),
                            "val_mean_accuracy": val.get("mean_accuracy"), "val_macro_f1": val.get("macro_f1")}
        return json_response(out)

    @app.get("/api/model", summary="The checkpoint's per-attribute metrics and training history")
    def model() -> Response:
        live = source.current()
        if live.opened is None:
            return json_response({"arch": None, "attributes": live.engine.attributes, "val_metrics": None,
                                  "test_metrics": None, "history": []})
        record = live.opened.catalog.get_model(live.engine.snapshot.model_id)
        if record.sha256 not in model_cache:
            model_cache[record.sha256] = _finite(_model_report(record))
        return json_response(model_cache[record.sha256])

    @app.get("/api/export", summary="All matches, streamed as csv, json or paths")
    def export(
        q: Annotated[str | None, Query()] = None,
        format: Annotated[str, Query(pattern="^(csv|json|paths)$")] = "csv",
        like_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        like: Annotated[str | None, Query()] = None,
        thresholds: Annotated[str | None, Query(description="Threshold set bare names use: f1 | accuracy "
                                                "(default: the index's), as `query --thresholds`")] = None,
        by: Annotated[str, Query(description="look | person, as /api/query")] = "look",
    ) -> Response:
        eng = source.current().engine  # held for the whole export: one consistent generation
        ref = _ranking(eng, by, like, like_id)
        expr = _expr(q)
        first = _run_query(eng, expr, limit=EXPORT_PAGE, offset=0, thresholds=thresholds, **ref)
        media = {"csv": "text/csv; charset=utf-8", "json": "application/json",
                 "paths": "text/plain; charset=utf-8"}[format]
        name = "facefind-export." + {"csv": "csv", "json": "json", "paths": "txt"}[format]
        return StreamingResponse(
            _export_chunks(eng, first, format, expr, ref, first.thresholds), media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{name}"',
                     "X-Total-Count": str(first.total)})

    return app


def live_cache(live: Live, key: str, make: Callable[[], Any]) -> Any:
    """A value derived once from ``live`` (its snapshot) and kept with it."""
    store = live.__dict__.setdefault("_derived", {})
    if key not in store:
        store[key] = make()
    return store[key]


def _run_query(eng: Engine, expr: str | None, *, limit: int, offset: int, thresholds: str | None = None,
               **ref: Any) -> Result:
    """``eng.query`` with a reference from ``_ranking`` (like, like_id, person, person_id)."""
    try:
        return eng.query(expr, limit=limit, offset=offset, thresholds=thresholds, **ref)
    except CatalogError as err:
        image_id = ref.get("like_id", ref.get("person_id"))
        if image_id is not None and "not in the index" in str(err):
            raise ApiError(404, f"no image with id {image_id} in the index (like_id)") from None
        raise


def _export_chunks(eng: Engine, first: Result, fmt: str, expr: str | None, ref: dict[str, Any],
                   thresholds: str | None) -> Iterator[bytes]:
    """The export body, one page of hits at a time (the engine is asked again for each page)."""
    names = list(eng.attributes)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["rank", "id", "path", "score", "matched", *names])
    elif fmt == "json":
        head = {k: v for k, v in first.to_dict().items() if k != "hits"}
        yield (json.dumps(head, separators=(",", ":"))[:-1] + ',"hits":[').encode()
    page, offset, rank = first, 0, 0
    while True:
        if fmt == "csv":
            for h in page.hits:
                rank += 1
                writer.writerow([rank, h.id, h.path, repr(h.score), "; ".join(h.matched),
                                 *(repr(h.attributes[a]) for a in names)])
            chunk = buf.getvalue()
            buf.seek(0)
            buf.truncate()
            yield chunk.encode()
        elif fmt == "json":
            parts = b",".join(orjson.dumps(h.to_dict()) for h in page.hits)
            yield (b"," if offset and parts else b"") + parts
        else:
            yield "".join(h.path + "\n" for h in page.hits).encode("utf-8", "surrogateescape")
        offset += len(page.hits)
        if offset >= first.total or not page.hits:
            break
        page = eng.query(expr, limit=EXPORT_PAGE, offset=offset, thresholds=thresholds, **ref)
    if fmt == "json":
        yield b"]}\n"


def _model_report(record: Any) -> dict[str, Any]:
    """Per-attribute metrics (catalog) and the training history (the checkpoint, when it is there)."""
    meta = record.meta or {}
    history: list[dict[str, Any]] = []
    if record.checkpoint and Path(record.checkpoint).is_file():
        try:
            from facefind.trainer.checkpoint import load_checkpoint

            history = list(load_checkpoint(Path(record.checkpoint))["meta"].get("history") or [])
        except FacefindError as err:
            log.warning("no training history: %s", err)
    return {"id": record.id, "arch": record.arch, "checkpoint": record.checkpoint,
            "attributes": record.attributes, "thresholds": record.thresholds,
            "epoch": meta.get("epoch"), "best_epoch": meta.get("best_epoch"),
            "val_metrics": meta.get("val_metrics"), "test_metrics": meta.get("test_metrics"),
            "history": history}


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def app_for_engine(engine: Engine, labels: Any = None, **kwargs: Any) -> FastAPI:
    """The app over an in-memory engine (benchmarks): no catalog, no uploads, no reloads."""
    return create_app(source=FixedIndex(engine, labels), **kwargs)

