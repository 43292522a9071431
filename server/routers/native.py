"""The native API: POST /v1/generate, batch class-conditional generation with token ids."""

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
    b64_image,
    check_count,
    resolve_label,
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
    return NativeImage(
        index=event.index, class_label=event.label,
        class_name=service.model.class_names[event.label], seed=event.seed,
        b64_json=await b64_image(service, event.pixels, options, event.seed, event.label,
                                 body.output_format, body.output_compression),
        tokens=event.tokens if body.return_tokens else None, seconds=round(event.seconds, 4))


@router.get("/classes")
def classes(model: str | None = None, state: AppState = Depends(get_state)) -> ClassList:
    """The class names a model draws (the playground's autocompletion)."""
    service = resolve_service(state, model)
    return ClassList(model=service.name, classes=service.model.class_names)


@router.post("/generate", response_model=None)
async def generate(body: NativeGenerateRequest, request: Request,
                   state: AppState = Depends(accepting)
                   ) -> NativeGenerateResponse | EventSourceResponse:
    """One image per label. Streaming sends `partial_image` events (image_index,
    partial_image_index, b64_json) and one `image` event per finished image, then `done`."""
    service = resolve_service(state, body.model)
    check_count(len(body.labels), state.settings, "labels")
    labels = [resolve_label(service, text, f"labels.{i}") for i, text in enumerate(body.labels)]
    options = sampling_options(body, greedy=body.greedy)
    reservation = service.admit(len(labels))
    request_id = request.state.request_id
    started, created = time.monotonic(), int(time.time())

    if body.stream:
        async def events() -> AsyncIterator[dict[str, str]]:
            async for event in service.generate(labels, options, request_id=request_id,
                                                partial_images=body.partial_images):
                if isinstance(event, Preview):
                    b64 = await b64_image(service, event.pixels, options, None,
                                          labels[event.index], body.output_format,
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
                  async for event in service.generate(labels, options, request_id=request_id)
                  if isinstance(event, Finished)]
        return sorted(images, key=lambda image: image.index)

    images = await respond(request, service, ENDPOINT, reservation, started, collect())
    return NativeGenerateResponse(id=request_id, created=created, model=service.name,
                                  size=service.size, output_format=body.output_format,
                                  images=images)
