"""Application state and the dependencies routers inject: state, API key, model service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Depends, Request
from starlette.datastructures import FormData

from engine.adapters import Adapter
from engine.credentials import ContentCredentials
from engine.service import ModelService
from server.errors import ServiceError
from server.fetch import FetchPolicy
from server.image_store import ImageStore
from server.settings import ServerSettings
from server.tenants import KeyRing, Tenant

T = TypeVar("T")


@dataclass
class AppState:
    settings: ServerSettings
    services: dict[str, ModelService] = field(default_factory=dict)  # by reported name
    names: dict[str, ModelService] = field(default_factory=dict)  # every name a client may use
    images: ImageStore | None = None
    credentials: ContentCredentials | None = None  # None: images are not signed
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)  # image URLs of edits
    keys: KeyRing = field(default_factory=KeyRing)  # none: no key is required
    ready: bool = False
    draining: bool = False
    engine_dead: str | None = None  # why, once the watchdog saw an engine core die
    open_streams: int = 0
    # Set by whoever runs the server: stop it (in-flight requests drain first).
    stop_server: Callable[[], None] | None = None


def get_state(request: Request) -> AppState:
    return request.app.state.llamagen


def require_api_key(request: Request, state: AppState = Depends(get_state)) -> Tenant | None:
    """The key's tenant (None when no key is required), also kept in `request.state.tenant`
    for the serving objects and the access log (which names it, never the key)."""
    if not state.keys.required:
        request.state.tenant = None
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    tenant = state.keys.lookup(given.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise ServiceError(401, "missing or invalid API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")
    request.state.tenant = tenant
    return tenant


def accepting(state: AppState = Depends(get_state)) -> AppState:
    """Refuse new generation work until ready, while draining and once an engine died."""
    if dead_engine(state):
        raise ServiceError.engine_unavailable()
    if state.draining:
        raise ServiceError(503, "server is shutting down", type="server_error",
                           code="draining", headers={"Retry-After": "5"})
    if not state.ready:
        raise ServiceError(503, "models are loading", type="server_error", code="not_ready",
                           headers={"Retry-After": "5"})
    return state


def dead_engine(state: AppState) -> str | None:
    """Why the server cannot generate any more, if an engine core died (seen at once, before
    the watchdog acts on it)."""
    dead = [name for name, service in state.services.items() if service.engine_dead]
    return state.engine_dead or (f"the engine core of {', '.join(dead)} died" if dead else None)


def resolve_service(state: AppState, model: str | None) -> ModelService:
    return resolve_target(state, model)[0]


def resolve_target(state: AppState, model: str | None) -> tuple[ModelService, Adapter | None]:
    """The served model a request names (any of its names), or one of its LoRA adapters,
    by name; None: the first model. A 404 lists what is served."""
    if model is None:
        return next(iter(state.services.values())), None
    service = state.names.get(model)
    if service is not None:
        return service, None
    for service in state.services.values():
        adapter = None if service.adapters is None else service.adapters.get(model)
        if adapter is not None:
            return service, adapter
    adapters = [a.name for s in state.services.values() if s.adapters for a in s.adapters.list()]
    raise ServiceError.model_not_found(model, [*state.names, *adapters])


def require_admin(request: Request, state: AppState = Depends(get_state)) -> None:
    """Runtime adapter updates: only an admin key (or anyone when no key is required)."""
    tenant = require_api_key(request, state)
    if tenant is not None and not tenant.spec.admin:
        raise ServiceError(403, f"API key {tenant.name!r} may not load or unload adapters "
                           "(an admin key may)", code="permission_denied")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (its vLLM requests are then
    aborted), since a plain HTTP handler is not cancelled on disconnect."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ServiceError(499, "client disconnected", code="client_closed_request")
    return task.result()


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Request, max_files: int = 2, extra: str = "") -> FormData:
    """A multipart/form-data body (a 400 for anything else or a malformed one; `extra`:
    what else the route takes, for its message)."""
    kind = content_type(request)
    if kind != "multipart/form-data":
        given = kind or "no content type"
        raise ServiceError(400, f"send the request as multipart/form-data, not {given}"
                           f"{extra}", code="invalid_content_type")
    # A few named fields and at most `max_files` files (image, mask); Starlette answers a
    # malformed body with a 400, which the error handlers put in the envelope.
    return await request.form(max_files=max_files, max_fields=64)
