"""OpenAI-style error bodies, {"error": {"message", "type", "param", "code"}}, for every failure the server
answers: a bad request is a 4xx with a message that says what to change, never a crash of the server."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve.engine import InputTooLong, UnsupportedTask

log = logging.getLogger("tunelab.serve")


class APIError(Exception):
    """An error answered with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=headers)


def unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served}'", param="model",
                    code="model_not_found")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                                       .rstrip(": "), code="invalid_json"))
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
    param = ".".join(loc) or None
    if first.get("type") == "missing" and param:
        message = f"Missing required parameter: '{param}'"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_response(APIError(400, message, param=param, code="invalid_value"))


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
        exc.status_code, "invalid_request_error")
    message = "Unknown path: " + request.url.path if exc.status_code == 404 else str(exc.detail)
    return error_response(APIError(exc.status_code, message, type=kind), headers=getattr(exc, "headers", None))


def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, InputTooLong):
        return error_response(APIError(400, str(exc), code="context_length_exceeded"))
    if isinstance(exc, UnsupportedTask):
        return error_response(APIError(400, str(exc), code="unsupported_task"))
    return error_response(APIError(400, str(exc)))


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error while answering %s", request.url.path)
    return error_response(APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda request, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind in (InputTooLong, UnsupportedTask, ValueError):
        app.add_exception_handler(kind, _engine_error)
    app.add_exception_handler(Exception, _internal_error)
