"""The OpenAI-compatible surface: /v1/images/generations, edits and variations, /v1/models,
/v1/images/files."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from server.deps import AppState, accepting, content_type, get_state, read_form, require_api_key
from server.errors import GENERATION_ERRORS, SSE_EVENT, ServiceError, error_responses
from server.image_store import StoreUnavailable
from server.protocol import (
    ImageEditJSONRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)
from server.serving import ServingEdits, ServingImages, ServingVariations
from vq_decoder.encoding import IMAGE_FORMATS

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"],
                   responses=error_responses(401))
STARTED = int(time.time())


@router.get("/models", response_model_exclude_none=True)
def list_models(state: AppState = Depends(get_state)) -> ModelList:
    """Every served model, then its LoRA adapters (with `parent`, as vLLM lists them)."""
    cards = []
    for name, s in state.services.items():
        common = dict(created=STARTED, task=s.model.gpt.model_type,
                      image_size=s.model.image_size, grid_size=s.model.grid_size,
                      num_classes=0 if s.model.is_t2i else s.model.gpt.num_classes,
                      max_model_len=s.model.max_model_len)
        cards.append(ModelCard(id=name, **common))
        for adapter in [] if s.adapters is None else s.adapters.list():
            cards.append(ModelCard(id=adapter.name, parent=name, **common))
    return ModelList(data=cards)


IMAGES_RESPONSE = {"model": ImagesResponse}


def _image_responses(events: str) -> dict[int | str, dict[str, Any]]:
    """The 200 (JSON, or a stream of `events` events) and every error status."""
    return {200: {**IMAGES_RESPONSE, "content": {"text/event-stream": {"schema": {
        **SSE_EVENT, "description": f"with `stream`: {events}.partial_image and "
        f"{events}.completed events (or one `error` event)"}}}}, **GENERATION_ERRORS}


@router.post("/images/generations", response_model=None,
             responses=_image_responses("image_generation"))
async def create_image(body: ImageGenerationRequest, request: Request,
                       state: AppState = Depends(accepting)) -> Response:
    return await ServingImages(state, request, body.model).create(body)


EDITS_PATH = "/v1/images/edits"
VARIATIONS_PATH = "/v1/images/variations"
BINARY = {"type": "string", "format": "binary"}


def form_schema(model: type[BaseModel], files: dict[str, str]) -> dict[str, Any]:
    """A multipart body: the model's fields beside `files` (name: description)."""
    schema = inline_defs(model.model_json_schema())
    # A form has no null: an optional field is left out instead.
    for name, prop in schema["properties"].items():
        options = [o for o in prop.get("anyOf", ()) if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            schema["properties"][name] = {**options[0], **rest}
            if rest.get("default", 0) is None:
                del schema["properties"][name]["default"]
    schema["properties"] = {**{name: {**BINARY, "description": text}
                               for name, text in files.items()}, **schema["properties"]}
    schema["required"] = [next(iter(files)), *schema.get("required", [])]
    return schema


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` written in place (an OpenAPI request body's
    schema cannot point into itself)."""
    defs = schema.pop("$defs", {})

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return expand(defs[ref.removeprefix("#/$defs/")])
            return {k: expand(v) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v) for v in node]
        return node

    return expand(schema)


IMAGE_FILE = ("PNG, JPEG or WebP; fitted to the model's size (centre crop, as the original "
              "prepares images)")


@router.post("/images/edits", response_model=None, openapi_extra={"requestBody": {
    "required": True, "content": {
        "multipart/form-data": {"schema": form_schema(ImageEditRequest, {
            "image": f"{IMAGE_FILE} (`image[]` as openai-python sends a list: one file)",
            "mask": "PNG with alpha, the image's size: redrawing starts at the first token "
                    "row holding a fully transparent pixel"})},
        "application/json": {"schema": inline_defs(ImageEditJSONRequest.model_json_schema())},
    }}}, responses=_image_responses("image_edit"))
async def edit_image(request: Request, state: AppState = Depends(accepting)) -> Response:
    """Complete an image: its token rows above the mask (or `keep_rows`) are kept, the rest
    is redrawn for `prompt`. Multipart with the files, or JSON with the images by reference
    (`data:` URLs; http(s) only from the hosts the server allows)."""
    if content_type(request) == "application/json":
        raw = await request.body()
        model = _json_model(raw)
        return await ServingEdits(state, request, model).create_from_json(raw)
    form = await read_form(request, extra=" (or application/json with images by reference)")
    try:
        model = form.get("model")  # a file there is refused with the other fields
        serving = ServingEdits(state, request, model if isinstance(model, str) else None)
        return await serving.create_from_form(form)
    finally:
        await form.close()  # the uploads are read before any response starts


def _json_model(raw: bytes) -> str | None:
    """The `model` a JSON body names, to pick the service (the body is validated later)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


@router.post("/images/variations", response_model=None, openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": form_schema(
        ImageVariationRequest, {"image": IMAGE_FILE})}}}},
    responses={200: IMAGES_RESPONSE, **GENERATION_ERRORS})
async def create_variation(request: Request, state: AppState = Depends(accepting)
                           ) -> Response:
    """Variations of an image: its top token rows (`keep_rows`, default half the grid) kept,
    the rest redrawn without a condition (the null class or caption)."""
    form = await read_form(request, max_files=1)
    try:
        model = form.get("model")
        serving = ServingVariations(state, request, model if isinstance(model, str) else None)
        return await serving.create_from_form(form)
    finally:
        await form.close()


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
