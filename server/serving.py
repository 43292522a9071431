"""Serving objects, one per generation request (as vLLM's `serving_*` classes): each owns its
request from checks and admission through generation, image encoding, streaming or
collecting, to release and accounting. Route handlers only construct one and call it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from PIL.Image import Image as PILImage
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.datastructures import FormData, UploadFile

from engine.conditions import Condition, check_prefix
from engine.credentials import SigningError
from engine.images import EditSource, ImageWriter
from engine.sampling import SamplingOptions, SamplingOverrides
from engine.service import Finished, Preview, QueueFull, Reservation
from engine.vllm_api import EngineDead
from model_registry.model_dir import ModelDir
from server import metrics
from server.deps import AppState, resolve_target, until_disconnected
from server.errors import ServiceError, validation_error
from server.fetch import FetchRefused, ImageSource, ImageTooLarge
from server.image_store import StoreUnavailable
from server.protocol import (
    CompletedEvent,
    EditCompletedEvent,
    EditPartialImageEvent,
    Image,
    ImageEditJSONRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOutput,
    ImageRef,
    ImageRequest,
    ImagesResponse,
    ImageTokensDetails,
    ImageVariationRequest,
    NativeGenerateRequest,
    NativeGenerateResponse,
    NativeImage,
    OutputFormat,
    PartialImageEvent,
    Usage,
)
from server.tenants import ANONYMOUS, OverLimit, Tenant
from vq_decoder.inputs import ImageInputError, fit_image, mask_redrawn, read_image

T = TypeVar("T")
log = logging.getLogger("llamagen.server")


class ServingRequest:
    """What every generation request does; subclasses map events to their API's shapes."""

    endpoint: ClassVar[str]

    def __init__(self, state: AppState, request: Request, model: str | None):
        self.state, self.request = state, request
        # A served model, or one of its LoRA adapters by name.
        self.service, self.adapter = resolve_target(state, model)
        self.model = self.service.model
        self.request_id: str = request.state.request_id
        self.started, self.created = time.monotonic(), int(time.time())
        self.reservation: Reservation | None = None
        # The API key's tenant (None: no key required), its limits' reservation, the
        # request's priority, and what it used (for the key's usage and the access log).
        self.tenant: Tenant | None = getattr(request.state, "tenant", None)
        self.key_name = ANONYMOUS if self.tenant is None else self.tenant.name
        self._tenant_release: Callable[[], None] | None = None
        self._adapter_release: Callable[[], None] | None = None
        self.priority = 0
        self.images_done = self.tokens_done = 0
        self.count_param = "n"  # what the request's image count is called (check_count)
        # Set by configure(), which every request kind calls before it generates.
        self.options: SamplingOptions
        self.writer: ImageWriter

    # ---- checks, in the order a request meets them ----

    def check_count(self, n: int, param: str) -> None:
        self.count_param = param
        check_count(n, self.state.settings.max_images_per_request, param)

    def set_priority(self, given: int | None) -> None:
        """The request's priority: the one given, else the key's default, else 0 (a 400 when
        the key may not ask for it or the engine does not schedule by priority)."""
        most_urgent = None if self.tenant is None else self.tenant.spec.most_urgent
        if given is not None and most_urgent is not None and given < most_urgent:
            raise ServiceError(400, f"priority: this API key may ask for {most_urgent} or a "
                               "larger (less urgent) value; lower runs first",
                               param="priority", code="priority_not_allowed")
        priority = given if given is not None else (
            0 if self.tenant is None else self.tenant.spec.default_priority)
        if priority != 0 and self.state.settings.scheduling_policy != "priority":
            raise priority_not_enabled("this server schedules first come, first served (start "
                                       "it with --scheduling-policy priority)")
        self.priority = priority

    def check_task(self, t2i: bool, param: str) -> None:
        """A caption for a class-conditional model, or labels for a text-conditional one."""
        if self.model.is_t2i != t2i:
            kind, wanted = (("text", "prompts") if self.model.is_t2i
                            else ("class", "labels (class ids or names)"))
            raise ServiceError(400, f"{self.service.name} is a {kind}-conditional model: send "
                               f"{wanted}", param=param, code="wrong_task")

    def configure(self, body: SamplingOverrides, fmt: OutputFormat,
                  compression: int | None, edit: EditSource | None = None,
                  size: int | None = None) -> None:
        """The request's sampling options (through the one priority chain) and output (and,
        for an edit, what it edits; `size`: the side delivered, when resampled)."""
        try:
            self.options = body.sampling_options(self.model.gpt.model_type)
        except ValidationError as e:
            raise validation_error(e) from None
        self.writer = ImageWriter(self.model, self.options, fmt, compression,
                                  self.state.credentials, edit=edit, size=size,
                                  adapter=None if self.adapter is None
                                  else self.adapter.describe())

    async def admit(self, texts: list[int | str], images: int, param: str, *,
                    indexed: bool = True, negatives: list[int | str] | None = None,
                    negative_param: str = "negative_prompt", negatives_indexed: bool = False
                    ) -> list[Condition]:
        """Room for `images` images (or 429), and one condition per text: class ids or names
        for c2i models (checked first: a bad one is a 400), captions for t2i models (encoded
        after admission, since encoding costs compute; released again if it fails).
        `negatives`: one per text (None: none), named `negative_param` (`.i` appended when
        `negatives_indexed`), each in the unguided stream of its text's condition."""
        check_negative(negatives, self.options, negative_param, negatives_indexed)
        if not self.model.is_t2i:
            conditions = class_conditions(self.model, texts, param, indexed)
            negative = (None if negatives is None else class_conditions(
                self.model, negatives, negative_param, negatives_indexed))
        self.reserve(images)
        if not self.model.is_t2i:
            return [c.with_negative(None if negative is None else negative[i])
                    for i, c in enumerate(conditions)]
        # One encoding per distinct text, prompts and negatives in one batch.
        distinct = list(dict.fromkeys(str(t) for t in [*texts, *(negatives or [])]))
        try:
            encoded = dict(zip(distinct, await self.service.encode_prompts(distinct),
                               strict=True))
        except BaseException:
            self.release()
            raise
        return [encoded[str(t)].with_negative(
                    None if negatives is None else encoded[str(negatives[i])])
                for i, t in enumerate(texts)]

    def reserve(self, images: int) -> None:
        """Room for `images` images within the API key's limits and the model's queue, or a
        429 (counted per key)."""
        if self.tenant is not None:
            try:
                self._tenant_release = self.tenant.admit(images)
            except OverLimit as e:
                metrics.KEY_REJECTIONS.labels(self.key_name, e.reason).inc()
                metrics.KEY_REQUESTS.labels(self.key_name, self.endpoint, "rejected").inc()
                if e.retry_after_s is None:
                    raise ServiceError(400, f"{e}: ask for fewer", param=self.count_param,
                                       code="exceeds_key_limit") from None
                raise ServiceError(429, f"{e}; retry later", type="rate_limit_error",
                                   code="key_limit_exceeded",
                                   headers={"Retry-After": str(e.retry_after_s)}) from None
        try:
            self.reservation = self.service.admit(images, self.priority)
        except QueueFull as e:
            self.release()
            metrics.KEY_REQUESTS.labels(self.key_name, self.endpoint, "rejected").inc()
            raise ServiceError.queue_full(e) from None
        if self.adapter is not None:
            assert self.service.adapters is not None
            # Held until the request ends: an unload meanwhile waits for its images.
            self._adapter_release = self.service.adapters.acquire(self.adapter)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
        if self._tenant_release is not None:
            self._tenant_release()
        if self._adapter_release is not None:
            self._adapter_release()

    # ---- generation and images ----

    async def generate(self, conditions: list[Condition], partial_images: int = 0,
                       prefixes: list[list[int]] | None = None
                       ) -> AsyncIterator[Preview | Finished]:
        """The service's events, within the request's deadline; a dead engine is a 503 and a
        passed deadline a 504 (its vLLM requests aborted either way)."""
        timeout = self.state.settings.request_timeout_s
        events = self.service.generate(conditions, self.options, prefixes=prefixes,
                                       partial_images=partial_images,
                                       request_id=self.request_id,
                                       deadline=self.started + timeout,
                                       priority=self.priority, adapter=self.adapter)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Finished):
                        self.images_done += 1
                        self.tokens_done += self.model.gpt.block_size - (
                            len(prefixes[event.index]) if prefixes else 0)
                    yield event
        except TimeoutError:
            metrics.TIMEOUTS.labels(self.service.name, self.endpoint).inc()
            raise ServiceError.timeout(timeout) from None
        except EngineDead:
            raise ServiceError.engine_unavailable() from None

    async def encode(self, pixels: np.ndarray, condition: Condition, seed: int | None,
                     prefix: Sequence[int] = ()) -> bytes:
        # Off the event loop: PNG compression and signing take milliseconds.
        try:
            return await asyncio.to_thread(self.writer.encode, pixels, condition, seed, prefix)
        except SigningError:
            log.exception("image signing failed", extra={"request_id": self.request_id})
            raise ServiceError(500, "image signing failed; the image was not delivered",
                               type="server_error", code="signing_failed") from None

    async def b64(self, pixels: np.ndarray, condition: Condition, seed: int | None,
                  prefix: Sequence[int] = ()) -> str:
        return base64.b64encode(await self.encode(pixels, condition, seed, prefix)).decode()

    def usage(self, conditions: list[Condition], prefix_len: int = 0) -> Usage:
        return image_usage(self.model, conditions, prefix_len)

    # ---- the two ways a request ends ----

    def stream(self, events: AsyncIterator[dict[str, str]]) -> EventSourceResponse:
        """Stream `events`; an error after the status line went out is reported in-band, as
        OpenAI does. Released and counted however it ends. At most --max-streams at once
        (counted while they run, so a burst may pass the cap by the streams not yet begun)."""
        limit = self.state.settings.max_streams
        if self.state.open_streams >= limit:
            self.release()
            raise ServiceError(429, f"too many open streams (limit {limit}); retry later or "
                               "ask without stream", type="rate_limit_error",
                               code="too_many_streams", headers={"Retry-After": "5"})

        async def guarded() -> AsyncIterator[dict[str, str]]:
            outcome = "error"
            self.state.open_streams += 1
            metrics.OPEN_STREAMS.set(self.state.open_streams)
            try:
                async with contextlib.aclosing(events):
                    async for item in events:
                        yield item
                outcome = "ok"
            except Exception as e:
                if not isinstance(e, ServiceError):
                    log.exception("stream failed", extra={"request_id": self.request_id})
                yield sse_error(e, self.request_id)
            finally:
                self.state.open_streams -= 1
                metrics.OPEN_STREAMS.set(self.state.open_streams)
                self._finish(outcome)

        # On shutdown (SIGTERM, a dead engine) sse-starlette would cut open streams at once;
        # the grace lets them finish, or send their error event, within the drain.
        grace = max(0.0, self.state.settings.drain_timeout_s - 1)
        return EventSourceResponse(guarded(), headers={"X-Request-Id": self.request_id},
                                   shutdown_grace_period=grace)

    async def collect(self, work: Awaitable[T]) -> T:
        """Run a non-streaming request's work, cancelled if the client leaves; released and
        counted however it ends."""
        outcome = "error"
        try:
            result = await until_disconnected(self.request, work)
            outcome = "ok"
            return result
        except ServiceError as e:
            if e.status == 499:
                outcome = "disconnected"
            raise
        finally:
            self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        self.release()
        metrics.REQUESTS.labels(self.service.name, self.endpoint, outcome).inc()
        metrics.KEY_REQUESTS.labels(self.key_name, self.endpoint, outcome).inc()
        if self.adapter is not None:
            metrics.ADAPTER_REQUESTS.labels(self.service.name, self.adapter.name, self.endpoint,
                                            outcome).inc()
        metrics.KEY_IMAGES.labels(self.key_name).inc(self.images_done)
        metrics.KEY_IMAGE_TOKENS.labels(self.key_name).inc(self.tokens_done)
        self.request.state.usage = {"images": self.images_done,
                                    "image_tokens": self.tokens_done}
        if outcome == "ok":
            metrics.REQUEST_LATENCY.labels(self.service.name, self.endpoint).observe(
                time.monotonic() - self.started)


class ServingImages(ServingRequest):
    """POST /v1/images/generations: n images of one prompt, in OpenAI's shapes."""

    endpoint = "images.generations"
    partial_event: ClassVar[type[PartialImageEvent]] = PartialImageEvent
    completed_event: ClassVar[type[CompletedEvent]] = CompletedEvent

    async def create(self, body: ImageGenerationRequest) -> Response:
        self.check_count(body.n, "n")
        self.set_priority(body.priority)
        size = self.output_size(body.size)
        self.configure(body, body.output_format, body.output_compression, size=size)
        # One prompt for all n images: resolved or encoded once.
        (condition,) = await self.admit([body.prompt], body.n, "prompt", indexed=False,
                                        negatives=self.negatives(body))
        return await self.respond(body, condition)

    @staticmethod
    def negatives(body: ImageRequest) -> list[int | str] | None:
        return None if body.negative_prompt is None else [body.negative_prompt]

    def output_size(self, size: str) -> int:
        """The side of the square images delivered (a 400 saying what is accepted)."""
        settings = self.state.settings
        return checked_size(size, self.model, self.service.name, settings.max_output_size,
                            settings.strict_size)

    @property
    def size(self) -> str:
        side = self.writer.size or self.model.image_size
        return f"{side}x{side}"

    async def respond(self, body: ImageRequest | ImageVariationRequest,
                      condition: Condition, prefix: list[int] | None = None,
                      found: dict[str, Any] | None = None) -> Response:
        """Generate body.n images of `condition` (completing `prefix`, for an edit), stream
        them or answer them all at once; `found`: extension fields every image carries."""
        found = found or {}
        if isinstance(body, ImageRequest) and body.stream:
            return self.stream(self._events(body, condition, prefix, found))
        data = await self.collect(self._images(body, condition, prefix, found))
        response = ImagesResponse(created=self.created, data=data,
                                  output_format=body.output_format, size=self.size,
                                  native_size=self.service.size,
                                  usage=self.usage([condition] * body.n, len(prefix or ())))
        return JSONResponse(response.model_dump(exclude_none=True))

    def _generate(self, body: ImageOutput, condition: Condition,
                  prefix: list[int] | None, partial_images: int = 0
                  ) -> AsyncIterator[Preview | Finished]:
        prefixes = None if prefix is None else [prefix] * body.n
        return self.generate([condition] * body.n, partial_images, prefixes)

    async def _events(self, body: ImageRequest,
                      condition: Condition, prefix: list[int] | None, found: dict[str, Any]
                      ) -> AsyncIterator[dict[str, str]]:
        common = dict(size=self.size, output_format=body.output_format)
        async for event in self._generate(body, condition, prefix, body.partial_images):
            if isinstance(event, Finished):
                yield sse(self.completed_event(
                    b64_json=await self.b64(event.pixels, condition, event.seed),
                    created_at=int(time.time()),
                    usage=self.usage([condition], len(prefix or ())),
                    image_index=event.index, seed=event.seed, class_label=condition.label,
                    revised_prompt=condition.caption, **common, **found))
            else:
                yield sse(self.partial_event(
                    b64_json=await self.b64(event.pixels, condition, None),
                    partial_image_index=event.partial_index, created_at=int(time.time()),
                    image_index=event.index, **common))

    async def _images(self, body: ImageOutput,
                      condition: Condition, prefix: list[int] | None, found: dict[str, Any]
                      ) -> list[Image]:
        formats = body.response_format or self.state.settings.default_response_format
        images: list[Image | None] = [None] * body.n
        async for event in self._generate(body, condition, prefix):
            assert isinstance(event, Finished)
            data = await self.encode(event.pixels, condition, event.seed)
            images[event.index] = Image(
                url=await self._store(data, needed=formats == "url")
                if formats in ("url", "both") else None,
                b64_json=(base64.b64encode(data).decode()
                          if formats in ("b64_json", "both") else None),
                seed=event.seed, class_label=condition.label,
                revised_prompt=condition.caption, **found)
        return [img for img in images if img is not None]

    async def _store(self, data: bytes, needed: bool = True) -> str | None:
        """The stored image's URL. When the store fails: a 503 if the client asked for a
        URL; None (the image goes as b64_json alone) if it asked for nothing in particular."""
        assert self.state.images is not None
        try:
            name = await self.state.images.save(data, self.writer.format)
        except StoreUnavailable:
            log.exception("image store failed", extra={"request_id": self.request_id})
            if not needed:
                return None
            raise ServiceError.store_unavailable() from None
        base = self.state.settings.public_url or str(self.request.base_url)
        return f"{base.rstrip('/')}/v1/images/files/{name}"


class UploadSource:
    """An input image uploaded in a multipart form."""

    def __init__(self, upload: UploadFile):
        self.upload = upload

    async def read(self, limit: int) -> bytes:
        data = await self.upload.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLarge(f"the file exceeds {limit} bytes")
        return data


class ServingEdits(ServingImages):
    """POST /v1/images/edits (multipart, or JSON with the images by reference): complete an
    input image. Its token rows above the first row the mask marks (or `keep_rows`, default
    half the grid) are kept as the prompt's prefix; the rest is redrawn under the prompt's
    condition. Every input is checked before anything is fetched, admitted or computed."""

    endpoint = "images.edits"
    partial_event = EditPartialImageEvent
    completed_event = EditCompletedEvent
    form_model: ClassVar[type[ImageEditRequest | ImageVariationRequest]] = ImageEditRequest
    files: ClassVar[tuple[str, ...]] = ("image", "mask")

    async def create_from_form(self, form: FormData) -> Response:
        fields, files = self._split(form)
        body = self._body(fields)
        if "image" not in files:
            raise ServiceError(400, "image: an image file is required", param="image",
                               code="missing_image")
        mask = files.get("mask")
        return await self.create(body, UploadSource(files["image"]),
                                 None if mask is None else UploadSource(mask))

    async def create_from_json(self, raw: bytes) -> Response:
        try:
            body = ImageEditJSONRequest.model_validate_json(raw, strict=True)
        except ValidationError as e:
            raise validation_error(e) from None
        image, mask = edit_references(body, self.state.fetch_policy.source)
        return await self.create(body, image, mask,
                                 params=("images.0.image_url", "mask.image_url"))

    async def create(self, body: ImageEditRequest | ImageVariationRequest,
                     image: ImageSource, mask: ImageSource | None = None,
                     params: tuple[str, str] = ("image", "mask")) -> Response:
        """`params`: what the image and the mask are called in the request."""
        self.check_count(body.n, "n")
        self.set_priority(body.priority)
        size = self.output_size(body.size)
        grid = self.model.grid_size
        keep_rows = edit_rows(body.keep_rows, mask is not None, grid)
        self.check_condition(body)
        data, picture, media_type = await self._read(image, params[0])
        if mask is not None:
            _, mask_image, _ = await self._read(mask, params[1])
            keep_rows = await asyncio.to_thread(rows_above_mask, mask_image, picture,
                                                self.model.image_size, grid)
        pixels = await asyncio.to_thread(fit_image, picture, self.model.image_size)
        self.configure(body, body.output_format, body.output_compression,
                       EditSource(data, media_type, keep_rows, grid,
                                  variation=isinstance(body, ImageVariationRequest)),
                       size=size)
        condition = await self.condition(body)
        try:
            codes = await self.service.encode_image(pixels)
        except BaseException:
            self.release()
            raise
        return await self.respond(body, condition, codes[: keep_rows * grid],
                                  {"kept_rows": keep_rows})

    def check_condition(self, body: ImageEditRequest | ImageVariationRequest) -> None:
        """What the images are conditioned on can be had: checked before any input is read
        or fetched (a c2i prompt names a class; admission resolves it again, cheaply)."""
        if not isinstance(body, ImageEditRequest):
            return
        if not self.model.is_t2i:
            class_conditions(self.model, [body.prompt], "prompt", indexed=False)
        if body.negative_prompt is not None:
            try:
                self.options = body.sampling_options(self.model.gpt.model_type)
            except ValidationError as e:
                raise validation_error(e) from None
            check_negative([body.negative_prompt], self.options, "negative_prompt")
            if not self.model.is_t2i:
                class_conditions(self.model, [body.negative_prompt], "negative_prompt",
                                 indexed=False)

    async def condition(self, body: ImageEditRequest | ImageVariationRequest) -> Condition:
        """Room for the images, and the condition they are drawn under."""
        assert isinstance(body, ImageEditRequest)
        (condition,) = await self.admit([body.prompt], body.n, "prompt", indexed=False,
                                        negatives=self.negatives(body))
        return condition

    def _split(self, form: FormData) -> tuple[dict[str, str], dict[str, UploadFile]]:
        fields: dict[str, str] = {}
        files: dict[str, UploadFile] = {}
        for key, value in form.multi_items():
            name = "image" if key == "image[]" else key
            if isinstance(value, UploadFile):
                if name not in self.files:
                    raise ServiceError(400, f"{key}: a file where text was expected",
                                       param=key, code="invalid_value")
                if name in files:
                    raise ServiceError(400, f"{key}: one {name} per request (a LlamaGen "
                                       "edit completes one input image)", param=key,
                                       code="invalid_value")
                files[name] = value
            else:
                if name in self.files:
                    raise ServiceError(400, f"{key}: must be a file upload", param=key,
                                       code="invalid_value")
                if name in fields:
                    raise ServiceError(400, f"{key}: given twice", param=key,
                                       code="invalid_value")
                fields[name] = value
        return fields, files

    def _body(self, fields: dict[str, str]) -> Any:
        """The form's text fields, typed by the request model as its schema says (booleans
        `true`/`false`, integers and numbers in JSON's notation), then validated strictly."""
        typed: dict[str, Any] = {}
        for name, text in fields.items():
            try:
                typed[name] = form_value(self.form_model, name, text)
            except ValueError as e:
                raise ServiceError(400, f"{name}: {e}", param=name,
                                   code="invalid_value") from None
        try:
            return self.form_model.model_validate(typed, strict=True)
        except ValidationError as e:
            raise validation_error(e) from None

    async def _read(self, source: ImageSource, param: str) -> tuple[bytes, PILImage, str]:
        """An input image -> (its bytes, the decoded image, its media type), or a 400."""
        try:
            data = await source.read(self.state.settings.max_upload_bytes)
        except FetchRefused as e:
            raise ServiceError(400, f"{param}: {e}", param=param, code=e.code) from None
        image, media_type = await asyncio.to_thread(
            read_input, data, param, self.state.settings.max_upload_pixels)
        return data, image, media_type


class ServingVariations(ServingEdits):
    """POST /v1/images/variations (multipart): the input image's top token rows
    (`keep_rows`, default half the grid) are kept and the rest is redrawn under the null
    condition, in both guidance streams: the model continues the picture as it sees fit."""

    endpoint = "images.variations"
    form_model = ImageVariationRequest
    files = ("image",)

    def check_condition(self, body: ImageEditRequest | ImageVariationRequest) -> None:
        if self.model.gpt.class_dropout_prob <= 0:
            raise ServiceError(400, f"{self.service.name} was trained without a null "
                               "condition, so it has no unconditional variations",
                               param="model", code="unsupported_model")

    async def condition(self, body: ImageEditRequest | ImageVariationRequest) -> Condition:
        assert self.service.null_condition is not None
        self.reserve(body.n)
        return self.service.null_condition


class ServingNative(ServingRequest):
    """POST /v1/generate: one image per label (c2i) or prompt (t2i), with token ids."""

    endpoint = "generate"

    async def create(self, body: NativeGenerateRequest
                     ) -> NativeGenerateResponse | EventSourceResponse:
        param = "labels" if body.labels is not None else "prompts"
        self.check_count(body.count, param)
        self.set_priority(body.priority)
        self.check_task(body.prompts is not None, param)
        self.configure(body, body.output_format, body.output_compression)
        texts: list[int | str] = list(body.prompts or body.labels or [])  # exactly one given
        prefixes = self._prefixes(body, param)
        negatives = body.negatives()
        if negatives is not None and len(negatives) != body.count:
            raise ServiceError(400, f"negative_prompts: {len(negatives)} for {body.count} "
                               f"{param}; give one per image", param="negative_prompts",
                               code="invalid_value")
        conditions = await self.admit(texts, body.count, param, negatives=negatives,
                                      negative_param="negative_prompts"
                                      if body.negative_prompts is not None
                                      else "negative_prompt",
                                      negatives_indexed=body.negative_prompts is not None)
        if body.stream:
            return self.stream(self._events(body, conditions, prefixes))
        images = await self.collect(self._images(body, conditions, prefixes))
        return NativeGenerateResponse(id=self.request_id, created=self.created,
                                      model=self.service.name if self.adapter is None
                                      else self.adapter.name, size=self.service.size,
                                      output_format=body.output_format, images=images)

    def _prefixes(self, body: NativeGenerateRequest, param: str) -> list[list[int]]:
        """Each image's given tokens (none: an empty prefix, a plain generation)."""
        if body.prefix_tokens is None:
            return [[] for _ in range(body.count)]
        if len(body.prefix_tokens) != body.count:
            raise ServiceError(400, f"prefix_tokens: {len(body.prefix_tokens)} lists for "
                               f"{body.count} {param}; give one per image", param="prefix_tokens",
                               code="invalid_prefix")
        prefixes = []
        for i, prefix in enumerate(body.prefix_tokens):
            try:
                prefixes.append(check_prefix(self.model, prefix))
            except ValueError as e:
                raise ServiceError(400, f"prefix_tokens.{i}: {e}", param=f"prefix_tokens.{i}",
                                   code="invalid_prefix") from None
        return prefixes

    async def _events(self, body: NativeGenerateRequest, conditions: list[Condition],
                      prefixes: list[list[int]]) -> AsyncIterator[dict[str, str]]:
        async for event in self.generate(conditions, body.partial_images, prefixes):
            if isinstance(event, Preview):
                b64 = await self.b64(event.pixels, conditions[event.index], None,
                                     prefixes[event.index])
                yield sse({"type": "partial_image", "image_index": event.index,
                           "partial_image_index": event.partial_index, "b64_json": b64})
            else:
                image = await self._image(body, event, prefixes)
                yield sse({"type": "image", **image.model_dump(exclude_none=True)})
        yield sse({"type": "done", "id": self.request_id, "model": self.service.name})

    async def _images(self, body: NativeGenerateRequest, conditions: list[Condition],
                      prefixes: list[list[int]]) -> list[NativeImage]:
        images = [await self._image(body, event, prefixes)
                  async for event in self.generate(conditions, prefixes=prefixes)
                  if isinstance(event, Finished)]
        return sorted(images, key=lambda image: image.index)

    async def _image(self, body: NativeGenerateRequest, event: Finished,
                     prefixes: list[list[int]]) -> NativeImage:
        label = event.condition.label
        return NativeImage(
            index=event.index, class_label=label,
            class_name=None if label is None else self.model.class_names[label],
            prompt=event.condition.caption, seed=event.seed,
            negative_prompt=self._negative(event.condition),
            b64_json=await self.b64(event.pixels, event.condition, event.seed,
                                    prefixes[event.index]),
            tokens=event.tokens if body.return_tokens else None,
            seconds=round(event.seconds, 4))


    def _negative(self, condition: Condition) -> str | None:
        negative = condition.negative
        if negative is None:
            return None
        return negative.caption if negative.label is None else \
            self.model.class_names[negative.label]


# ---- the checks a request meets, shared with `llamagen sample`'s Batch lines ----

def edit_references(body: ImageEditJSONRequest, source: Callable[[str], T]
                    ) -> tuple[T, T | None]:
    """A JSON edit's image and mask, each `source(image_url)` (which raises FetchRefused
    for a URL it will not read), checked without reading them; a 400 naming the field."""
    if len(body.images) > 1:
        raise ServiceError(400, f"images: {len(body.images)} images; an edit here "
                           "completes one input image", param="images",
                           code="invalid_value")

    def reference(ref: ImageRef, param: str) -> T:
        if ref.file_id is not None:
            raise ServiceError(400, f"{param}.file_id: there is no Files API here; send "
                               "the image as image_url (a data: URL)",
                               param=f"{param}.file_id", code="unsupported_file_id")
        assert ref.image_url is not None
        try:
            return source(ref.image_url)
        except FetchRefused as e:
            raise ServiceError(400, f"{param}.image_url: {e}", param=f"{param}.image_url",
                               code="invalid_image_url") from None

    return (reference(body.images[0], "images.0"),
            None if body.mask is None else reference(body.mask, "mask"))


def edit_rows(keep_rows: int | None, masked: bool, grid: int) -> int:
    """The token rows an edit keeps from the top: `keep_rows`, or half the grid (a mask's
    rows replace them, `rows_above_mask`); a 400 for keep_rows beside a mask, or for one
    that leaves nothing to redraw."""
    if masked and keep_rows is not None:
        raise ServiceError(400, "keep_rows: give a mask or keep_rows, not both",
                           param="keep_rows", code="invalid_value")
    rows = grid // 2 if keep_rows is None else keep_rows
    if rows >= grid:
        raise ServiceError(400, f"keep_rows: at most {grid - 1} (the grid has {grid} "
                           "rows; at least one is redrawn)", param="keep_rows",
                           code="invalid_value")
    return rows


def read_input(data: bytes, param: str, max_pixels: int) -> tuple[PILImage, str]:
    """An input image's bytes -> (the decoded image, its media type), or a 400."""
    try:
        image, spec = read_image(data, max_pixels=max_pixels)
    except ImageInputError as e:
        raise ServiceError(400, f"{param}: {e}", param=param, code="invalid_image") from None
    return image, spec.media_type


def rows_above_mask(mask: PILImage, image: PILImage, size: int, grid: int) -> int:
    """The token rows above the first one the mask redraws (its fully transparent pixels,
    at the model's `size`), or a 400."""
    if mask.size != image.size:
        raise ServiceError(400, f"mask: it is {mask.width}x{mask.height}, the image "
                           f"{image.width}x{image.height}; they must match", param="mask",
                           code="invalid_mask")
    try:
        redrawn = mask_redrawn(mask, size)
    except ImageInputError as e:
        raise ServiceError(400, f"mask: {e}", param="mask", code="invalid_mask") from None
    rows = np.flatnonzero(redrawn.any(axis=1))
    if rows.size == 0:
        raise ServiceError(400, "mask: no fully transparent pixel, so nothing to redraw",
                           param="mask", code="invalid_mask")
    return int(rows[0]) // (size // grid)


def check_count(n: int, limit: int, param: str) -> None:
    if n > limit:
        raise ServiceError(400, f"{param}: at most {limit} images per request",
                           param=param, code="too_many_images")


def priority_not_enabled(why: str) -> ServiceError:
    return ServiceError(400, f"priority: {why}", param="priority", code="priority_not_enabled")


def checked_size(size: str, model: ModelDir, name: str, cap: int, strict: bool) -> int:
    """The side of the square images delivered (a 400 saying what is accepted)."""
    try:
        return output_side(size, model.image_size, cap, strict=strict)
    except ValueError as e:
        raise ServiceError(400, f"size {size[:40]!r} is not supported by {name}; accepted: "
                           f"{e}", param="size", code="unsupported_size") from None


def check_negative(negatives: Sequence[int | str] | None, options: SamplingOptions,
                   param: str, indexed: bool = False) -> None:
    """A negative needs guidance: with cfg_scale <= 1 the unguided stream is not used."""
    if negatives is not None and options.cfg_scale <= 1:
        raise ServiceError(400, f"{param}: a negative prompt steers guidance, and "
                           f"cfg_scale is {options.cfg_scale:g}; give cfg_scale > 1",
                           param=param, code="negative_without_guidance")
    for i, text in enumerate(negatives or []):
        if isinstance(text, str) and not text.strip():
            where = f"{param}.{i}" if indexed else param
            raise ServiceError(400, f"{where}: must not be empty", param=where,
                               code="invalid_value")


def class_conditions(model: ModelDir, labels: Sequence[int | str], param: str,
                     indexed: bool) -> list[Condition]:
    """Class ids or names -> conditions (a 400 naming the first unknown one)."""
    conditions = []
    for i, text in enumerate(labels):
        try:
            conditions.append(Condition(label=model.resolve_label(text)))
        except ValueError as e:
            where = f"{param}.{i}" if indexed else param
            raise ServiceError(400, str(e), param=where, code="unknown_class") from None
    return conditions


def image_usage(model: ModelDir, conditions: Sequence[Condition], prefix_len: int = 0
                ) -> Usage:
    """Input tokens: the class token, or the caption's T5 tokens, plus an edit's kept image
    tokens; output: the image tokens generated."""
    conditioning = sum(c.input_tokens for c in conditions)
    kept = len(conditions) * prefix_len
    outputs = len(conditions) * (model.gpt.block_size - prefix_len)
    return Usage(input_tokens=conditioning + kept,
                 input_tokens_details=ImageTokensDetails(text_tokens=conditioning,
                                                         image_tokens=kept),
                 output_tokens=outputs, total_tokens=conditioning + kept + outputs,
                 output_tokens_details=ImageTokensDetails(image_tokens=outputs))


SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
MIN_OUTPUT_SIZE = 16


def output_side(size: str, native: int, cap: int, *, strict: bool = False) -> int:
    """`size` -> the side of the square images delivered: the model's own for `auto` and
    its native size, another square side (resampled) from MIN_OUTPUT_SIZE to `cap` unless
    `strict`. ValueError saying what is accepted."""
    if size == "auto":
        return native
    match = SIZE.fullmatch(size)
    side = int(match[1]) if match and match[1] == match[2] else None
    if side == native:
        return native
    if strict:
        raise ValueError(f"'auto' or {native}x{native}")
    if side is None or not MIN_OUTPUT_SIZE <= side <= cap:
        raise ValueError(f"'auto', {native}x{native} (native) or a square size from "
                         f"{MIN_OUTPUT_SIZE}x{MIN_OUTPUT_SIZE} to {cap}x{cap} (resampled)")
    return side
# Longer integers are out of every field's range (and Python refuses to convert those of
# over 4300 digits, with a message that is not for clients).
JSON_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,29})")
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,29})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?")


def form_value(model: type[BaseModel], name: str, text: str) -> Any:
    """A multipart text field -> the JSON type the model's field has (unknown fields and
    strings stay text)."""
    field = model.model_fields.get(name)
    if field is None:
        return text
    kinds = {t for t in (typing.get_args(field.annotation) or (field.annotation,))
             if t is not type(None)}
    if bool in kinds:
        if text not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text[:40]!r}")
        return text == "true"
    if int in kinds:
        if not JSON_INTEGER.fullmatch(text):
            raise ValueError(f"expected an integer (at most 30 digits), got {text[:40]!r}")
        return int(text)
    if float in kinds:
        if not JSON_NUMBER.fullmatch(text):
            raise ValueError(f"expected a number, got {text[:40]!r}")
        return float(text)
    return text


def sse(event: BaseModel | dict[str, Any]) -> dict[str, str]:
    data = event.model_dump(exclude_none=True) if isinstance(event, BaseModel) else event
    return {"event": data["type"], "data": json.dumps(data)}


def sse_error(e: Exception, request_id: str) -> dict[str, str]:
    error = e if isinstance(e, ServiceError) else ServiceError.internal(request_id)
    return {"event": "error", "data": json.dumps({"error": error.info().model_dump()})}
