"""Runtime LoRA adapter updates, vLLM's routes and shapes: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter. Mounted only with --allow-runtime-lora-updating, and only admin API
keys may call them (`server.deps.require_admin`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from engine.adapters import AdapterNotFound
from model_registry.lora import AdapterError
from server.deps import AppState, get_state, require_admin, resolve_service
from server.errors import ServiceError, error_responses
from server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], tags=["lora"],
                   responses=error_responses(400, 401, 403, 404))


def _taken(state: AppState, name: str) -> bool:
    return name in state.names or any(
        s.adapters is not None and name in s.adapters for s in state.services.values())


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest,
                            state: AppState = Depends(get_state)) -> PlainTextResponse:
    try:
        service = resolve_service(state, body.base_model_name)
    except ServiceError as e:  # named by this request's own field
        raise ServiceError(404, f"base_model_name: {e.message}", param="base_model_name",
                           code="model_not_found") from None
    if service.adapters is None:
        raise ServiceError(400, f"{service.name} serves no adapters: start the server with "
                           "--enable-lora", param="base_model_name", code="lora_disabled")
    if _taken(state, body.lora_name):
        raise ServiceError(400, f"lora_name: {body.lora_name!r} is already a model's or an "
                           "adapter's name", param="lora_name", code="invalid_value")
    try:
        await service.adapters.load(body.lora_name, body.lora_path)
    except AdapterError as e:
        raise ServiceError(400, f"lora_path: {e}", param="lora_path",
                           code="invalid_adapter") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              state: AppState = Depends(get_state)) -> PlainTextResponse:
    for service in state.services.values():
        if service.adapters is not None and body.lora_name in service.adapters:
            try:
                await service.adapters.unload(body.lora_name)
            except AdapterNotFound:
                break  # unloaded meanwhile
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
    raise ServiceError(404, f"lora_name: no adapter named {body.lora_name!r} is loaded",
                       param="lora_name", code="adapter_not_found")
