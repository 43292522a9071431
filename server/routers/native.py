"""The native API: POST /v1/generate, batch generation (one image per label or prompt) with
token ids; GET /v1/classes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.deps import AppState, accepting, get_state, require_api_key, resolve_service
from server.errors import GENERATION_ERRORS, SSE_EVENT, error_responses
from server.protocol import ClassList, NativeGenerateRequest, NativeGenerateResponse
from server.serving import ServingNative

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["native"],
                   responses=error_responses(401))


@router.get("/classes", responses=error_responses(404))
def classes(model: str | None = None, state: AppState = Depends(get_state)) -> ClassList:
    """The class names a model draws (the playground's autocompletion; none for t2i)."""
    service = resolve_service(state, model)
    return ClassList(model=service.name,
                     classes=[] if service.model.is_t2i else service.model.class_names)


@router.post("/generate", response_model=None, responses={
    200: {"model": NativeGenerateResponse, "content": {"text/event-stream": {"schema": {
        **SSE_EVENT, "description": "with `stream`: partial_image, image and done events (or "
        "one `error` event)"}}}},
    **GENERATION_ERRORS})
async def generate(body: NativeGenerateRequest, request: Request,
                   state: AppState = Depends(accepting)
                   ) -> NativeGenerateResponse | EventSourceResponse:
    """One image per label (c2i) or prompt (t2i). Streaming sends `partial_image` events
    (image_index, partial_image_index, b64_json) and one `image` event per finished image,
    then `done`."""
    return await ServingNative(state, request, body.model).create(body)
