"""The native API: POST /v1/generate, batch generation (one image per label or prompt) with
token ids."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.deps import (
    AppState,
    accepting,
    get_state,
    require_api_key,
    resolve_service,
)
from server.protocol import ClassList, NativeGenerateRequest, NativeGenerateResponse, NativeImage
from server.routers.common import (
    admit_conditions,
    b64_image,
    check_count,
    check_task,
    respond,
    sampling_options,
    sse,
    sse_response,
)
from server.service import Finished, ModelService, Preview

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["native"])
ENDPOINT = "generate"


async def _native_image(service: ModelService, body: NativeGenerateRequest, options,
                        event: Finished) -> NativeImage:
    label = event.condition.label
    return NativeImage(
        index=event.index, class_label=label,
        class_name=None if label is None else service.model.class_names[label],
        prompt=event.condition.caption, seed=event.seed,
        b64_json=await b64_image(service, event.pixels, options, event.seed, event.condition,
                                 body.output_format, body.output_compression),
        tokens=event.tokens if body.return_tokens else None, seconds=round(event.seconds, 4))


@router.get("/classes")
def classes(model: str | None = None, state: AppState = Depends(get_state)) -> ClassList:
    """The class names a model draws (the playground's autocompletion; none for t2i)."""
    service = resolve_service(state, model)
    return ClassList(model=service.name,
                     classes=[] if service.model.is_t2i else service.model.class_names)


@router.post("/generate", response_model=None)
async def generate(body: NativeGenerateRequest, request: Request,
                   state: AppState = Depends(accepting)
                   ) -> NativeGenerateResponse | EventSourceResponse:
    """One image per label (c2i) or prompt (t2i). Streaming sends `partial_image` events
    (image_index, partial_image_index, b64_json) and one `image` event per finished image,
    then `done`."""
    service = resolve_service(state, body.model)
    param = "labels" if body.labels is not None else "prompts"
    check_count(body.count, state.settings, param)
    check_task(service, body.prompts is not None, param)
    options = sampling_options(body, service, greedy=body.greedy)
    started, created = time.monotonic(), int(time.time())
    texts: list[int | str] = list(body.prompts or body.labels or [])  # exactly one is given
    reservation, conditions = await admit_conditions(service, texts, body.count, param)
    request_id = request.state.request_id

    if body.stream:
        async def events() -> AsyncIterator[dict[str, str]]:
            async for event in service.generate(conditions, options, request_id=request_id,
                                                partial_images=body.partial_images):
                if isinstance(event, Preview):
                    b64 = await b64_image(service, event.pixels, options, None,
                                          conditions[event.index], body.output_format,
                                          body.output_compression)
                    yield sse({"type": "partial_image", "image_index": event.index,
                               "partial_image_index": event.partial_index, "b64_json": b64})
                else:
                    image = await _native_image(service, body, options, event)
                    yield sse({"type": "image", **image.model_dump(exclude_none=True)})
            yield sse({"type": "done", "id": request_id, "model": service.name})

        return sse_response(service, ENDPOINT, reservation, started, request_id, events())

    async def collect() -> list[NativeImage]:
        images = [await _native_image(service, body, options, event)
                  async for event in service.generate(conditions, options,
                                                      request_id=request_id)
                  if isinstance(event, Finished)]
        return sorted(images, key=lambda image: image.index)

    images = await respond(request, service, ENDPOINT, reservation, started, collect())
    return NativeGenerateResponse(id=request_id, created=created, model=service.name,
                                  size=service.size, output_format=body.output_format,
                                  images=images)
