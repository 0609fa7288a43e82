"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Every response body the server writes for an error comes from :func:`error_body`. Messages are written here or
are the request's own validation text; a worker's traceback, file paths and process ids are logged on the
server and never reach a client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("pycfg.serve")

# the OpenAI API's error types by status
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """An error the server answers with, in OpenAI's shape."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending request field in ``param``."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


async def api_error_handler(request, err: APIError) -> JSONResponse:
    return error_response(err)


async def http_error_handler(request, err: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body over the limit) in OpenAI's shape."""
    messages = {404: "No such endpoint.", 405: "Method not allowed for this endpoint.",
                413: "The request body is too large.", 408: "The request body was not received in time."}
    message = messages.get(err.status_code, str(err.detail))
    return error_response(APIError(err.status_code, message, headers=dict(err.headers or {}) or None))


async def unexpected_error_handler(request, err: Exception) -> JSONResponse:
    # the client learns only that it failed; the server log has the traceback
    logger.exception("unexpected error while answering %s %s", request.method, request.url.path)
    return error_response(APIError(500, "The server had an error while processing your request."))
