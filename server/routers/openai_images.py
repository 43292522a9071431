"""The OpenAI-compatible surface: /v1/images/generations, /v1/models, /v1/images/files."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from sse_starlette import EventSourceResponse

from server.deps import (
    AppState,
    accepting,
    get_state,
    require_api_key,
    resolve_service,
)
from server.image_store import EXTENSIONS
from server.protocol import (
    CompletedEvent,
    Image,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    PartialImageEvent,
)
from server.routers.common import (
    admit_conditions,
    b64_image,
    check_count,
    encoded_image,
    respond,
    sampling_options,
    sse,
    sse_response,
    usage,
)
from server.service import Finished, ModelService, ServiceError

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])
ENDPOINT = "images.generations"
STARTED = int(time.time())


@router.get("/models")
def list_models(state: AppState = Depends(get_state)) -> ModelList:
    return ModelList(data=[
        ModelCard(id=name, created=STARTED, task=s.model.gpt.model_type,
                  image_size=s.model.image_size,
                  num_classes=0 if s.model.is_t2i else s.model.gpt.num_classes,
                  max_model_len=s.model.max_model_len)
        for name, s in state.services.items()])


def _check_size(service: ModelService, size: str) -> None:
    if size not in ("auto", service.size):
        raise ServiceError(400, f"size {size!r} is not supported by {service.name}; supported "
                           f"sizes: 'auto', {service.size!r}", param="size",
                           code="unsupported_size")


@router.post("/images/generations", response_model=None)
async def create_image(body: ImageGenerationRequest, request: Request,
                       state: AppState = Depends(accepting)
                       ) -> ImagesResponse | EventSourceResponse:
    service = resolve_service(state, body.model)
    check_count(body.n, state.settings, "n")
    _check_size(service, body.size)
    options = sampling_options(body, service)
    started = time.monotonic()
    # One prompt for all n images: resolved or encoded once.
    reservation, (condition,) = await admit_conditions(service, [body.prompt], body.n, "prompt",
                                                       indexed=False)
    conditions = [condition] * body.n
    label, revised = condition.label, condition.caption
    request_id = request.state.request_id
    created = int(time.time())

    if body.stream:
        async def events() -> AsyncIterator[dict[str, str]]:
            async for event in service.generate(conditions, options, request_id=request_id,
                                                partial_images=body.partial_images):
                b64 = await b64_image(service, event.pixels, options,
                                      getattr(event, "seed", None), condition,
                                      body.output_format, body.output_compression)
                if isinstance(event, Finished):
                    yield sse(CompletedEvent(
                        b64_json=b64, created_at=int(time.time()), size=service.size,
                        output_format=body.output_format, usage=usage(service, [condition]),
                        image_index=event.index, seed=event.seed, class_label=label,
                        revised_prompt=revised))
                else:
                    yield sse(PartialImageEvent(
                        b64_json=b64, partial_image_index=event.partial_index,
                        created_at=int(time.time()), size=service.size,
                        output_format=body.output_format, image_index=event.index))

        return sse_response(service, ENDPOINT, reservation, started, request_id, events())

    async def collect() -> list[Image]:
        images: list[Image | None] = [None] * body.n
        async for event in service.generate(conditions, options, request_id=request_id):
            assert isinstance(event, Finished)
            if body.response_format == "url":
                assert state.images is not None
                data = await encoded_image(service, event.pixels, options, event.seed,
                                           condition, body.output_format,
                                           body.output_compression)
                name = state.images.save(data, body.output_format)
                base = state.settings.public_url or str(request.base_url)
                images[event.index] = Image(url=f"{base.rstrip('/')}/v1/images/files/{name}",
                                            seed=event.seed, class_label=label,
                                            revised_prompt=revised)
            else:
                images[event.index] = Image(
                    b64_json=await b64_image(service, event.pixels, options, event.seed,
                                             condition, body.output_format,
                                             body.output_compression),
                    seed=event.seed, class_label=label, revised_prompt=revised)
        return [img for img in images if img is not None]

    data = await respond(request, service, ENDPOINT, reservation, started, collect())
    return ImagesResponse(created=created, data=data, output_format=body.output_format,
                          size=service.size, usage=usage(service, conditions))


@router.get("/images/files/{name}")
def image_file(name: str, state: AppState = Depends(get_state)) -> FileResponse:
    path = state.images.path(name) if state.images else None
    if path is None:
        raise ServiceError(404, "image not found or expired", param="name",
                           code="image_not_found")
    media = {v: k for k, v in EXTENSIONS.items()}[path.suffix[1:]]
    return FileResponse(path, media_type=f"image/{media}")
