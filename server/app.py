"""The FastAPI application: lifespan (engines, decoders), middleware, error envelope, routers.

Every error a client sees is OpenAI's envelope `{"error": {message, type, param, code}}` with
the right status; no stack trace leaves the server. Every response carries `X-Request-Id`
(the client's, if it sent a sane one).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_registry.model_dir import load_model_dir
from server.deps import AppState
from server.image_store import ImageStore
from server.protocol import ErrorInfo, ErrorResponse
from server.routers import native, openai_images, ops, playground
from server.service import ModelService, ServiceError
from server.settings import ServerSettings

log = logging.getLogger("llamagen.server")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        for key in ("request_id", "method", "path", "status", "seconds"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("llamagen")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def error_response(status: int, message: str, *, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class RequestContext:
    """X-Request-Id in and out, a body-size cap, and one access log line per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.monotonic(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]
                message["headers"] = [*raw, (b"x-request-id", request_id.encode())]
            await send(message)

        length = headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            if too_big:
                raise BodyTooLarge
            await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge:
            response = error_response(413, f"request body exceeds {self.max_body_bytes} bytes",
                                      code="request_too_large")
            await response(scope, receive, send_with_id)
        finally:
            if scope["path"] not in ("/metrics", "/health", "/ready"):
                log.info("request", extra={"request_id": request_id, "method": scope["method"],
                                           "path": scope["path"], "status": status,
                                           "seconds": round(time.monotonic() - start, 4)})


class BodyTooLarge(Exception):
    pass


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
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param,
                              code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail),
                              type="invalid_request_error" if exc.status_code < 500
                              else "server_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request.state.request_id})
        return error_response(500, "internal server error", type="server_error")


def create_app(settings: ServerSettings) -> FastAPI:
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.images = ImageStore(settings.image_dir, settings.image_ttl_s)
        state.images.start()
        try:
            for path in settings.model:
                model = load_model_dir(path)
                if model.name in state.services:
                    raise ValueError(f"two models are named {model.name!r}")
                service = ModelService(model, settings, models_served=len(settings.model))
                state.services[model.name] = service
                await service.start()
                log.info(f"serving {model.name} from {path}")
            state.ready = True
            yield
        finally:
            state.ready = False
            for service in state.services.values():
                await service.stop()
            await state.images.stop()

    app = FastAPI(title="llamagen-serve", version="0.1.0", lifespan=lifespan,
                  description="LlamaGen image generation on vLLM: OpenAI-style images API, a "
                              "native batch API, streaming previews, Prometheus metrics.")
    app.state.llamagen = state
    add_error_handlers(app)
    app.include_router(openai_images.router)
    app.include_router(native.router)
    app.include_router(ops.router)
    app.include_router(playground.router)
    app.mount("/static", playground.static_files(), name="static")
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    return app
