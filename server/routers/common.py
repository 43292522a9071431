"""What both generation APIs share: request checks, image encoding, usage, SSE framing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse

from server import metrics
from server.deps import until_disconnected
from server.generation import Condition, SamplingOptions, image_provenance
from server.protocol import ImageTokensDetails, SamplingExtensions, Usage
from server.service import ModelService, Reservation, ServiceError
from server.settings import ServerSettings
from vq_decoder.encoding import encode_image

T = TypeVar("T")


def check_count(n: int, settings: ServerSettings, param: str) -> None:
    if n > settings.max_images_per_request:
        raise ServiceError(400, f"{param}: at most {settings.max_images_per_request} images "
                           "per request", param=param, code="too_many_images")


def sampling_options(body: SamplingExtensions, service: ModelService, **extra: Any
                     ) -> SamplingOptions:
    try:
        options = body.sampling_options(service.model)
        return options.model_copy(update=extra) if extra else options
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise ServiceError(400, f"{param}: {err['msg']}", param=param) from None


def check_task(service: ModelService, t2i: bool, param: str) -> None:
    """A caption for a class-conditional model, or labels for a text-conditional one: 400."""
    if service.model.is_t2i != t2i:
        kind, wanted = (("text", "prompts") if service.model.is_t2i
                        else ("class", "labels (class ids or names)"))
        raise ServiceError(400, f"{service.name} is a {kind}-conditional model: send {wanted}",
                           param=param, code="wrong_task")


def class_conditions(service: ModelService, labels: list[int | str], param: str, *,
                     indexed: bool = True) -> list[Condition]:
    """Class ids or names -> conditions, or a 400 naming the bad one (`param.i` if indexed)."""
    conditions = []
    for i, text in enumerate(labels):
        try:
            conditions.append(Condition(label=service.model.resolve_label(text)))
        except ValueError as e:
            where = f"{param}.{i}" if indexed else param
            raise ServiceError(400, str(e), param=where, code="unknown_class") from None
    return conditions


async def admit_conditions(service: ModelService, texts: list[int | str], images: int,
                           param: str, *, indexed: bool = True
                           ) -> tuple[Reservation, list[Condition]]:
    """Room for `images` images (or 429), and one condition per text: class ids or names for
    c2i models (checked first: a bad one is a 400), captions for t2i models (encoded after
    admission, since encoding costs compute; the reservation is released if it fails)."""
    if not service.model.is_t2i:
        conditions = class_conditions(service, texts, param, indexed=indexed)
        return service.admit(images), conditions
    reservation = service.admit(images)
    try:
        return reservation, await service.encode_prompts([str(t) for t in texts])
    except BaseException:
        reservation.release()
        raise


async def b64_image(service: ModelService, pixels: Any, options: SamplingOptions,
                    seed: int | None, condition: Condition, fmt: str,
                    compression: int | None) -> str:
    data = await encoded_image(service, pixels, options, seed, condition, fmt, compression)
    return base64.b64encode(data).decode()


async def encoded_image(service: ModelService, pixels: Any, options: SamplingOptions,
                        seed: int | None, condition: Condition, fmt: str,
                        compression: int | None) -> bytes:
    metadata = image_provenance(service.model, options, seed, condition)
    # Off the event loop: PNG compression of a large image takes milliseconds.
    return await asyncio.to_thread(encode_image, pixels, fmt, metadata=metadata,  # type: ignore[arg-type]
                                   compression=compression)


def usage(service: ModelService, conditions: list[Condition]) -> Usage:
    """Input tokens: the class token, or the caption's T5 tokens; output: the image tokens."""
    inputs = sum(c.input_tokens for c in conditions)
    outputs = len(conditions) * service.model.gpt.block_size
    text = inputs if service.model.is_t2i else 0
    return Usage(input_tokens=inputs, input_tokens_details=ImageTokensDetails(text_tokens=text),
                 output_tokens=outputs, total_tokens=inputs + outputs,
                 output_tokens_details=ImageTokensDetails(image_tokens=outputs))


def observe_request(service: ModelService, endpoint: str, outcome: str, started: float) -> None:
    metrics.REQUESTS.labels(service.name, endpoint, outcome).inc()
    if outcome == "ok":
        metrics.REQUEST_LATENCY.labels(service.name, endpoint).observe(
            time.monotonic() - started)


def sse_response(service: ModelService, endpoint: str, reservation: Reservation,
                 started: float, request_id: str,
                 events: AsyncIterator[dict[str, str]]) -> EventSourceResponse:
    """Stream `events`; an error after the status line went out is reported in-band, as
    OpenAI does. The reservation is released and the request counted however it ends."""
    async def guarded() -> AsyncIterator[dict[str, str]]:
        outcome = "error"
        try:
            async with contextlib.aclosing(events):
                async for item in events:
                    yield item
            outcome = "ok"
        except Exception as e:
            yield sse_error(e)
        finally:
            reservation.release()
            observe_request(service, endpoint, outcome, started)

    return EventSourceResponse(guarded(), headers={"X-Request-Id": request_id})


async def respond(request: Request, service: ModelService, endpoint: str,
                  reservation: Reservation, started: float, work: Awaitable[T]) -> T:
    """Run a non-streaming request's work, cancelled if the client leaves; release and count
    it however it ends."""
    outcome = "error"
    try:
        result = await until_disconnected(request, work)
        outcome = "ok"
        return result
    except ServiceError as e:
        if e.status == 499:
            outcome = "disconnected"
        raise
    finally:
        reservation.release()
        observe_request(service, endpoint, outcome, started)


def sse(event: BaseModel | dict[str, Any], name: str | None = None) -> dict[str, str]:
    data = event.model_dump(exclude_none=True) if isinstance(event, BaseModel) else event
    return {"event": name or data["type"], "data": json.dumps(data)}


def sse_error(e: Exception) -> dict[str, str]:
    if isinstance(e, ServiceError):
        info = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
    else:
        info = {"message": "image generation failed", "type": "server_error", "param": None,
                "code": None}
    return {"event": "error", "data": json.dumps({"error": info})}
