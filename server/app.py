"""The FastAPI application: lifespan (model services), middleware, error handlers, routers.

Every response carries `X-Request-Id` (the client's, if it sent a sane one); every error is
OpenAI's envelope (`server.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.credentials import ContentCredentials
from engine.service import ModelService
from model_registry.model_dir import load_model_dir
from server.deps import AppState, dead_engine
from server.errors import ServiceError, add_error_handlers
from server.fetch import FetchPolicy
from server.image_store import open_image_store
from server.routers import lora, native, openai_images, ops, playground
from server.routers.openai_images import EDITS_PATH, VARIATIONS_PATH
from server.settings import ServerSettings
from server.tenants import KeyRing

log = logging.getLogger("llamagen.server")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        for key in ("request_id", "method", "path", "status", "seconds", "key", "images",
                    "image_tokens"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:  # an operator's log: the traceback belongs there (never to clients)
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("llamagen")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RequestContext:
    """X-Request-Id in and out, a body-size cap, and one access log line per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float,
                 upload_paths: dict[str, int] | None = None):
        """upload_paths: routes that take file uploads, with their own body limits."""
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.upload_paths = upload_paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status, started = time.monotonic(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                raw = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]
                message["headers"] = [*raw, (b"x-request-id", request_id.encode())]
            await send(message)

        limit = self.upload_paths.get(scope["path"], self.max_body_bytes)
        length = headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > limit
        received, body_done = 0, False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later reads wait for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise ServiceError.body_timeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise ServiceError.body_too_large(limit)
            return message

        try:
            if too_big:
                raise ServiceError.body_too_large(limit)
            await self.app(scope, limited_receive, send_with_id)
        except Exception as e:
            # Answered here, inside this middleware, so that even a 500 carries X-Request-Id.
            # A ServiceError gets here when raised before the app (Content-Length too large).
            if not isinstance(e, ServiceError):
                log.exception("unhandled error", extra={"request_id": request_id})
            if started:  # too late for a status: the connection is closed on the client
                raise
            error = e if isinstance(e, ServiceError) else ServiceError.internal(request_id)
            await error.response()(scope, receive, send_with_id)
        finally:
            if scope["path"] not in ("/metrics", "/health", "/ready"):
                # The key's name and what the request used (set by the route, if it got so
                # far); never the key itself.
                request_state = scope["state"]
                tenant = request_state.get("tenant")
                usage = request_state.get("usage", {})
                log.info("request", extra={"request_id": request_id, "method": scope["method"],
                                           "path": scope["path"], "status": status,
                                           "seconds": round(time.monotonic() - start, 4),
                                           **({} if tenant is None else {"key": tenant.name}),
                                           **usage})





ENGINE_POLL_S = 0.2
UNREADY_BEFORE_EXIT_S = 2.0


async def watch_engines(state: AppState) -> None:
    """Once an engine core dies: refuse new work (503 with Retry-After), fail /ready and
    /health (both see the dead core at once), keep answering so for a moment, so that load
    balancers and clients get a clear 503 rather than a reset connection, then stop the server
    so that its orchestrator starts a fresh one. vLLM 0.32 offers no clean restart of a dead
    engine core inside a running AsyncLLM; a new process is what vLLM's own server does too.
    In-flight requests get their 503s while uvicorn drains them (--drain-timeout-s)."""
    while True:
        await asyncio.sleep(ENGINE_POLL_S)
        if reason := dead_engine(state):
            state.engine_dead = reason
            log.error("%s: stopping the server", reason)
            await asyncio.sleep(min(UNREADY_BEFORE_EXIT_S, state.settings.drain_timeout_s))
            if state.stop_server is not None:
                state.stop_server()
            return


async def watch_keys(state: AppState) -> None:
    """Read the keys file again whenever it changes (SIGHUP reads it at once)."""
    if state.settings.api_keys_file is None:
        return
    while True:
        await asyncio.sleep(state.settings.api_keys_reload_s)
        if state.keys.changed():
            state.keys.reload()


def create_app(settings: ServerSettings, credentials: ContentCredentials | None = None
               ) -> FastAPI:
    """The app; `credentials`: the C2PA signer when the caller made it already (else made
    from the settings at startup)."""
    # A bad keys file stops the start here, naming its line, before any engine starts.
    keys = KeyRing(None if settings.api_key is None else settings.api_key.get_secret_value(),
                   settings.api_keys_file,
                   priorities=settings.scheduling_policy == "priority")
    state = AppState(settings=settings, credentials=credentials, keys=keys,
                     fetch_policy=FetchPolicy.from_settings(settings.image_url_hosts,
                                                            settings.image_url_networks,
                                                            settings.image_url_timeout_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.credentials is None:
            state.credentials = ContentCredentials.from_settings(settings)
        state.images = open_image_store(settings.image_store, settings.image_dir,
                                        settings.image_ttl_s, settings.image_store_endpoint)
        await state.images.start()  # an unusable store stops the start, saying why
        try:
            models = [load_model_dir(path) for path in settings.model]
            if len({m.name for m in models}) < len(models):
                raise ValueError("two models have the same directory name: give each its "
                                 "own directory name")
            names = settings.served_names([m.name for m in models])
            adapters = settings.adapters(names)
            for model in models:
                served = names[model.name]
                service = ModelService(model, settings, models_served=len(models),
                                       name=served[0])
                state.services[service.name] = service
                state.names.update(dict.fromkeys(served, service))
                await service.start()
                log.info(f"serving {model.path} as {', '.join(served)}")
                for name, path in adapters[model.name]:
                    assert service.adapters is not None  # --lora-modules turn LoRA on
                    await service.adapters.load(name, path)
            state.ready = True
            watchdog = asyncio.create_task(watch_engines(state), name="engine-watchdog")
            reloader = asyncio.create_task(watch_keys(state), name="keys-reloader")
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # Only where the loop runs in the main thread (uvicorn: yes).
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, state.keys.reload)
            yield
            watchdog.cancel()
            reloader.cancel()
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
    if settings.allow_runtime_lora_updating:
        if not keys.required:
            log.warning("--allow-runtime-lora-updating without an API key: anyone who reaches "
                        "the server may load adapters from its disk")
        app.include_router(lora.router)
    app.include_router(ops.router)
    app.include_router(playground.router)
    app.mount("/static", playground.static_files(), name="static")
    # An edit carries an image and a mask (a variation an image): the route's files are
    # checked one by one (--max-upload-bytes each, a 400), the body as a whole here. A JSON
    # edit carries them as base64 data: URLs, a third larger.
    upload = settings.max_upload_bytes * 4 // 3 + 1024
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s,
                       upload_paths={EDITS_PATH: 2 * upload + settings.max_body_bytes,
                                     VARIATIONS_PATH: upload + settings.max_body_bytes})

    def openapi() -> dict[str, Any]:
        """FastAPI's document without its 422s: validation errors are 400s here, documented
        with the error envelope on each route."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
