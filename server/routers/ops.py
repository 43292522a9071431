"""Operations: /health, /ready, /metrics, /version (no API key, as vLLM's own)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from engine.vllm_api import vllm_version
from model_registry.convert import software_version
from server.deps import AppState, dead_engine, get_state

router = APIRouter(tags=["operations"])


STATUS = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}}}}


@router.get("/health", response_class=JSONResponse, responses={
    200: {"description": "Every engine answers and makes progress", **STATUS},
    503: {"description": "Starting, or an engine is dead or wedged", **STATUS}})
async def health(state: AppState = Depends(get_state)) -> JSONResponse:
    """200 while every engine answers and makes progress; 503 when one is dead or wedged."""
    if not state.services:
        return JSONResponse({"status": "starting"}, status_code=503)
    problems = {name: why for name, s in state.services.items()
                if (why := await s.check_health()) is not None}
    if problems:
        return JSONResponse({"status": "unhealthy", "models": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_class=JSONResponse, responses={
    200: {"description": "Taking traffic", **STATUS},
    503: {"description": "Loading, draining, or an engine died", **STATUS}})
def ready(state: AppState = Depends(get_state)) -> JSONResponse:
    """503 until the models are loaded, while draining and once an engine died: take no new
    traffic."""
    if reason := dead_engine(state):
        return JSONResponse({"status": "engine_dead", "reason": reason}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "models": list(state.services)})


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition (`vllm:*` and `llamagen_*`)",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics_endpoint() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
def version(state: AppState = Depends(get_state)) -> dict[str, object]:
    import torch

    return {"version": software_version(), "torch": torch.__version__, "vllm": vllm_version(),
            "models": {name: {"path": str(s.model.path), "gpt_sha256": s.model.gpt_sha256}
                       for name, s in state.services.items()}}
