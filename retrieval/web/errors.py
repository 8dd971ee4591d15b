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


# What the API routers declare, so that /openapi.json lists the refusals with their shape. "4XX"
# also stands for FastAPI's default 422, which this server never sends (a bad parameter is a 400).
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Bad input: a bad expression, parameter, photo or reference"},
    404: {"model": ErrorOut, "description": "No image with this id in the index, or its file is gone"},
    "4XX": {"model": ErrorOut, "description": "Refused by the guard: 401 without the server's token, "
                                              "403 not addressed to localhost, 413 a body over 20 MB"},
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
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(400, f"bad {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request refused"
        return error_response(err.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, "internal error (the server log has the details); the server keeps serving")
