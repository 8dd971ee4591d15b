"""Every refusal is one line of JSON, ``{"error": ...}`` (plus ``position`` and ``expression`` for a
bad expression); nothing returns a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from facefind.db.errors import FacefindError, QuerySyntaxError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a one-line message (and optional extra JSON fields)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class ErrorOut(BaseModel):
    """A refusal: one line that says what to do."""

    error: str
    position: int | None = None    # a bad expression: where it goes wrong ...
    expression: str | None = None  # ... in this expression


# What the API routers declare, so that /openapi.json lists every refusal with its shape. FastAPI's
# default 422 is never sent (a bad parameter is a 400) and is dropped from the document (app.py).
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Bad input: a parameter out of its schema, an expression that "
                                            "does not parse or names an unknown attribute, an unreadable photo"},
    401: {"model": ErrorOut, "description": "The server was started with --token and the request lacks it"},
    403: {"model": ErrorOut, "description": "Without a token the server answers only requests addressed to "
                                            "localhost"},
    404: {"model": ErrorOut, "description": "No image with this id in the index, its file is gone, or a "
                                            "photo search's reference (like=) has expired"},
    409: {"model": ErrorOut, "description": "The request does not fit the index or itself: by=person on an "
                                            "index without identity descriptors, or without like/like_id, "
                                            "a face without a descriptor, like and like_id together"},
    413: {"model": ErrorOut, "description": "A request body over 20 MB (answered once the body is read, "
                                            "or before it with Expect: 100-continue)"},
    500: {"model": ErrorOut, "description": "A bug: one line, the server log has the details, the server "
                                            "keeps serving"},
}


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status)


def add_error_handlers(app: FastAPI) -> None:
    """Map every failure to a one-line JSON error: ours, FastAPI's and Starlette's, and bugs."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, **err.extra)

    @app.exception_handler(QuerySyntaxError)
    async def _syntax(_: Request, err: QuerySyntaxError) -> JSONResponse:
        return error_response(400, err.message, position=err.position, expression=err.expression)

    @app.exception_handler(FacefindError)
    async def _facefind(_: Request, err: FacefindError) -> JSONResponse:
        return error_response(400, str(err).splitlines()[0] if str(err) else type(err).__name__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = tuple(first.get("loc", ()))
        if loc[:1] == ("path",):  # a URL segment that is no id names nothing: 404, as any unknown URL
            raw = str(first.get("input", ""))[:40]
            return error_response(404, f"no image with id {raw!r}: ids are the numbers /api/query returns")
        where = ".".join(str(p) for p in loc[1:]) or "request"
        return error_response(400, f"bad {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request refused"
        if err.status_code == 405:
            message = f"method {request.method} is not allowed here: use {err.headers.get('Allow', 'GET')}" \
                if err.headers else "method not allowed"
        # Starlette's own headers (405's Allow, which RFC 9110 requires) go out with our JSON body
        return JSONResponse({"error": message}, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, "internal error (the server log has the details); the server keeps serving")
