"""One error shape for every failure: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's, so its
clients read it), a status that says whose fault it is, and a message naming the field -- never the value the
client sent (a request body may hold a patient's image or text)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve.meddr")  # under "ray.serve": Serve writes it to the replica logs

# type of the error body, by status
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_image",
    422: "invalid_image",
    500: "server_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """An answer other than 200, raised anywhere below a route; the message must not quote the request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None, headers=None):
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``; pydantic's union-branch labels
    (``list[...]``, ``function-after[...]``) are dropped: the client never wrote them."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "body" and not parts:
            continue
        elif "[" in str(item) or str(item) in ("str", "int", "float", "bool"):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_message(errors: Sequence[Dict[str, Any]]) -> tuple:
    """The most specific validation error (the deepest field: for a union, the branch the client meant) as
    ``(message, field)``, in words that name the field but not its value."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    kind, field = first.get("type", ""), field_name(first.get("loc", ()))
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if not field and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object", None
    if kind == "missing":
        return f"field '{field}' is required", field
    if kind == "extra_forbidden":
        return f"field '{field}' is not accepted here", field
    # pydantic's own wording ("Input should be a valid integer", "List should have at least 2 items", ...)
    # describes the constraint without repeating the input
    msg = str(first.get("msg", "is not valid"))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"field '{field}': {msg}{more}" if field else f"{msg}{more}", field or None


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the error shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, field = validation_message(exc.errors())
        return error_response(400, message, param=field)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}: see GET /v1/models and the API docs"
            return error_response(404, message, code="unknown_endpoint")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        # the type only: an exception's text may quote what it was given
        log.error("request %s on %s failed: %s", _request_id(request), request.url.path, type(exc).__name__)
        return error_response(500, f"internal error (request {_request_id(request)})")


def _request_id(request: Request) -> str:
    return request_id() or request.headers.get("x-request-id", "-")


def request_id() -> Optional[str]:
    """Serve's id of the request being handled (it also goes back to the client as the ``x-request-id`` header)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a replica, or the private context moved
        return None


def replica_id() -> Optional[str]:
    """Serve's id of this replica (the last part of its actor's name ``SERVE_REPLICA::<app>#<deployment>#<id>``,
    what ``serve status`` and the replica's log file name show); None outside a replica."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica (a test calling the class directly), or the context moved
        return None
