"""The OpenAI-compatible surface: /v1/images/generations, /v1/models, /v1/images/files."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from server.deps import AppState, accepting, get_state, read_form, require_api_key
from server.errors import GENERATION_ERRORS, SSE_EVENT, ServiceError, error_responses
from server.image_store import StoreUnavailable
from server.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from server.serving import ServingEdits, ServingImages
from vq_decoder.encoding import IMAGE_FORMATS

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"],
                   responses=error_responses(401))
STARTED = int(time.time())


@router.get("/models")
def list_models(state: AppState = Depends(get_state)) -> ModelList:
    return ModelList(data=[
        ModelCard(id=name, created=STARTED, task=s.model.gpt.model_type,
                  image_size=s.model.image_size, grid_size=s.model.grid_size,
                  num_classes=0 if s.model.is_t2i else s.model.gpt.num_classes,
                  max_model_len=s.model.max_model_len)
        for name, s in state.services.items()])


@router.post("/images/generations", response_model=None, responses={
    200: {"model": ImagesResponse, "content": {"text/event-stream": {"schema": {
        **SSE_EVENT, "description": "with `stream`: image_generation.partial_image and "
        "image_generation.completed events (or one `error` event)"}}}},
    **GENERATION_ERRORS})
async def create_image(body: ImageGenerationRequest, request: Request,
                       state: AppState = Depends(accepting)
                       ) -> ImagesResponse | EventSourceResponse:
    return await ServingImages(state, request, body.model).create(body)


EDITS_PATH = "/v1/images/edits"


def _edit_form_schema() -> dict:
    """The multipart body: ImageEditRequest's fields beside the `image` and `mask` files."""
    schema = ImageEditRequest.model_json_schema()
    # A form has no null: an optional field is left out instead.
    for name, prop in schema["properties"].items():
        options = [o for o in prop.get("anyOf", ()) if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            schema["properties"][name] = {**options[0], **rest}
            if rest.get("default", 0) is None:
                del schema["properties"][name]["default"]
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {**binary, "description": "PNG, JPEG or WebP; fitted to the model's size "
                  "(centre crop, as the original prepares images)"},
        "mask": {**binary, "description": "PNG with alpha, the image's size: redrawing "
                 "starts at the first token row holding a fully transparent pixel"},
        **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


@router.post("/images/edits", response_model=None, openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": _edit_form_schema()}}}},
    responses={200: {"model": ImagesResponse, "content": {"text/event-stream": {"schema": {
        **SSE_EVENT, "description": "with `stream`: image_edit.partial_image and "
        "image_edit.completed events (or one `error` event)"}}}},
    **GENERATION_ERRORS})
async def edit_image(request: Request, state: AppState = Depends(accepting)
                     ) -> ImagesResponse | EventSourceResponse:
    """Complete an image: its token rows above the mask (or `keep_rows`) are kept, the rest
    is redrawn for `prompt`."""
    form = await read_form(request)
    try:
        model = form.get("model")  # a file there is refused with the other fields
        serving = ServingEdits(state, request, model if isinstance(model, str) else None)
        return await serving.create_from_form(form)
    finally:
        await form.close()  # the uploads are read before any response starts


@router.get("/images/files/{name}", response_class=Response, responses={
    200: {"content": {spec.media_type: {"schema": {"type": "string", "format": "binary"}}
                      for spec in IMAGE_FORMATS.values()}},
    **error_responses(404, 503)})
async def image_file(name: str, state: AppState = Depends(get_state)) -> Response:
    try:
        found = await state.images.get(name) if state.images else None
    except StoreUnavailable:
        raise ServiceError.store_unavailable() from None
    if found is None:
        raise ServiceError(404, "image not found or expired", param="name",
                           code="image_not_found")
    data, spec = found
    return Response(data, media_type=spec.media_type)
