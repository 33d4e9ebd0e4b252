"""Errors in the shape OpenAI clients parse: ``{"error": {"message", "type", "param", "code"}}``.

``code`` is the HTTP status (vLLM's convention); ``param`` names the offending request field."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afdserve.core import InvalidRequest

logger = logging.getLogger("afdserve.server")

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered with ``status``; raise it anywhere below a route."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class EngineDeadError(RuntimeError):
    """The engine (a worker process, or the engine thread) failed; no request can be served."""


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def sse_error(status: int, message: str, param: str | None = None) -> str:
    """An error in the middle of a stream: one SSE event with the error object (then ``[DONE]``)."""
    return f"data: {json.dumps(error_body(status, message, param))}\n\n"


def as_api_error(e: BaseException) -> APIError:
    """The status and message a client sees for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e), e.param)
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    logger.exception("internal error while serving a request", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}: {e})")


def validation_error(e: RequestValidationError) -> APIError:
    """Pydantic's first complaint, as a 400 naming the top-level field (``param``)."""
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {why}".rstrip(": "))
    param = loc[0] if loc and isinstance(loc[0], str) else None
    where = ".".join(str(p) for p in loc) or "body"
    return APIError(400, f"{where}: {err.get('msg')}", param)


def install_handlers(app: FastAPI) -> None:
    """Every error a route can raise leaves in the OpenAI shape; none is a bare 500 page."""

    async def api_error(_: Request, e: Exception) -> JSONResponse:
        err = as_api_error(e)
        return error_response(err.status, err.message, err.param)

    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(e)
        return error_response(err.status, err.message, err.param)

    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(InvalidRequest, api_error)
    app.add_exception_handler(EngineDeadError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, api_error)
