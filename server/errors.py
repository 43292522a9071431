"""Errors as clients see them: OpenAI's envelope `{"error": {message, type, param, code}}`
with the right status, whatever raised them; no stack trace leaves the server."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.service import QueueFull
from server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("llamagen.server")


class ServiceError(StarletteHTTPException):
    """An error for the client, in the OpenAI envelope's terms. An HTTPException, so that
    FastAPI lets it through even from inside request-body reading."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    @classmethod
    def queue_full(cls, e: QueueFull) -> ServiceError:
        return cls(429, str(e), type="rate_limit_error", code="queue_full",
                   headers={"Retry-After": str(e.retry_after_s)})

    @classmethod
    def model_not_found(cls, model: str, available: list[str]) -> ServiceError:
        return cls(404, f"model {model!r} not found; available: {', '.join(available)}",
                   param="model", code="model_not_found")

    @classmethod
    def engine_unavailable(cls) -> ServiceError:
        return cls(503, "the generation engine died; this server is restarting, retry on "
                   "another replica or shortly", type="server_error", code="engine_unavailable",
                   headers={"Retry-After": "10"})

    @classmethod
    def store_unavailable(cls) -> ServiceError:
        return cls(503, "the image store is unavailable; ask for response_format b64_json or "
                   "retry later", type="server_error", code="image_store_unavailable",
                   headers={"Retry-After": "5"})

    @classmethod
    def timeout(cls, seconds: float) -> ServiceError:
        return cls(504, f"the request did not finish within {seconds:g} s and was aborted",
                   type="server_error", code="request_timeout")

    @classmethod
    def body_too_large(cls, limit: int) -> ServiceError:
        return cls(413, f"request body exceeds {limit} bytes", code="request_too_large")

    @classmethod
    def body_timeout(cls, seconds: float) -> ServiceError:
        return cls(408, f"request body not received within {seconds:g} s",
                   code="body_timeout", headers={"Connection": "close"})

    @classmethod
    def internal(cls, request_id: str) -> ServiceError:
        return cls(500, f"internal server error (request {request_id})", type="server_error",
                   code="internal_error")

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info()).model_dump(),
                            status_code=self.status, headers=self.headers)


ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a wrong type or value, an unknown class, too many "
         "images (`param` names the field)",
    401: "Missing or invalid API key (`Authorization: Bearer KEY`)",
    403: "The API key may not do this (runtime adapter updates need an admin key)",
    404: "Unknown model, adapter or image",
    405: "Method not allowed (`Allow` lists the allowed ones)",
    408: "Request body not received within --body-timeout-s",
    413: "Request body larger than --max-body-bytes",
    429: "Too many images in flight; retry after `Retry-After` seconds",
    500: "Internal error; `X-Request-Id` and the message name the request",
    503: "Loading, draining, or the engine died; retry after `Retry-After` seconds",
    504: "The request passed --request-timeout-s and was aborted",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: each status with the error envelope's schema."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
            for status in statuses}


# One server-sent event of a streamed response: its name and its JSON payload.
SSE_EVENT: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "a JSON object"}}}

# What every generation request can answer besides 200.
GENERATION_ERRORS = error_responses(400, 404, 408, 413, 429, 500, 503, 504)


def validation_error(e: ValidationError) -> ServiceError:
    """A request model's validation error -> the 400 naming its (first) field."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return ServiceError(400, "request body is not valid JSON", code="invalid_value")
    param = ".".join(str(p) for p in err["loc"]) or None
    message = f"{param}: {err['msg']}" if param else f"request body: {err['msg']}"
    return ServiceError(400, message, param=param, code="invalid_value")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if err.get("type") == "model_attributes_type" or not loc:
        return f"request body: {err.get('msg')}", None
    param = ".".join(loc)
    return f"{param}: {err.get('msg')}", param


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ServiceError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ServiceError(exc.status_code, str(exc.detail),
                            type="invalid_request_error" if exc.status_code < 500
                            else "server_error", headers=getattr(exc, "headers", None)).response()

