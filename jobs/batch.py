"""OpenAI Batch files: input lines `{custom_id, method, url, body}` in, output lines
`{id, custom_id, response: {status_code, request_id, body}, error}` out.

A line's body meets the server's own request model and checks (`server.protocol`,
`server.serving`), so a line is answered as the server would answer it: a 200 with an
`ImagesResponse`, or the server's 4xx envelope. A line that is not a request at all (not
JSON, no `custom_id`, a repeated `custom_id`, another method or URL) gets an `error` and
no response, as OpenAI's Batch API does. Either way the run goes on.

`/v1/images/edits` lines carry the JSON edit (`images: [{image_url}]`, optional `mask`), as
the server's JSON route takes it, and are completions as there: the image's top token rows
(above the mask, or `keep_rows`) are kept and the rest redrawn.

What differs from the server, by necessity: `stream` is refused (a line is answered whole);
`priority` other than 0 is refused (every line runs; there is no queue to order); a line
without `response_format` gets `b64_json` (there is no server to fetch a URL from), and
`response_format: "url"` stores each image beside the run's outputs and answers its
location (`file://` or `s3://`). An edit's images must be data: URLs: `sample` fetches no
URL (no operator allow-list guards a batch job's network access).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from engine.conditions import Condition
from engine.images import EditSource, ImageWriter
from engine.sampling import SamplingOptions
from jobs.job import SEED_MODULUS, SampleJob
from model_registry.model_dir import ModelDir
from server.errors import ServiceError, validation_error
from server.fetch import DataUrl, FetchRefused
from server.protocol import (
    Image,
    ImageEditJSONRequest,
    ImageGenerationRequest,
    ImagesResponse,
)
from server.serving import (
    check_count,
    check_negative,
    checked_size,
    class_conditions,
    edit_references,
    edit_rows,
    image_usage,
    priority_not_enabled,
    read_input,
    rows_above_mask,
)
from server.settings import ServerSettings
from vq_decoder.encoding import IMAGE_FORMATS
from vq_decoder.inputs import fit_image

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
# An edit line's input images are held to the server's default limits.
MAX_INPUT_BYTES = ServerSettings.model_fields["max_upload_bytes"].default
MAX_INPUT_PIXELS = ServerSettings.model_fields["max_upload_pixels"].default


class LineError(Exception):
    """A line that is no request: answered with `error` and no response."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass
class LineRequest:
    """A checked generation line, ready for the engine."""

    line: int
    custom_id: str
    body: ImageGenerationRequest | ImageEditJSONRequest
    options: SamplingOptions
    side: int
    seeds: list[int | None]
    texts: list[str]  # t2i: the prompt, then the negative (encoded by the actor)
    condition: Condition | None = None  # c2i now; t2i once encoded
    # An edit: its input file, and the image fitted to the model's size (encoded by the
    # actor, whose codes' first kept rows become `prefix`).
    edit: EditSource | None = None
    pixels: np.ndarray | None = None
    prefix: list[int] = field(default_factory=list)


def envelope(line: int, job: SampleJob, custom_id: str | None, *,
             status: int | None = None, body: dict[str, Any] | None = None,
             error: LineError | None = None) -> dict[str, Any]:
    """One output line; its ids are derived from the run and the line, so a resumed run
    writes the same ones."""
    h = hashlib.sha256(f"{job.items_sha256}:{line}".encode()).hexdigest()
    return {"id": f"batch_req_{h[:32]}", "custom_id": custom_id,
            "response": None if status is None else
            {"status_code": status, "request_id": f"req_{h[32:64]}", "body": body},
            "error": None if error is None else {"code": error.code, "message": error.message}}


def error_line(line: int, job: SampleJob, custom_id: str | None, e: ServiceError
               ) -> dict[str, Any]:
    return envelope(line, job, custom_id, status=e.status,
                    body={"error": e.info().model_dump()})


def parse_line(text: str, duplicate: bool = False) -> tuple[str, str, dict[str, Any]]:
    """A line -> (custom_id, url, body), or LineError. `duplicate`: an earlier line had its
    custom_id (found by `jobs.job.batch_items`, across the whole file)."""
    try:
        record = json.loads(text)
    except ValueError:
        raise LineError("invalid_json", "the line is not valid JSON") from None
    if not isinstance(record, dict):
        raise LineError("invalid_request", "the line is not a JSON object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "custom_id: a non-empty string is required")
    if duplicate:
        raise LineError("duplicate_custom_id", f"custom_id {custom_id[:64]!r} was used by an "
                        "earlier line; each must be unique", custom_id)
    if record.get("method") != "POST":
        raise LineError("invalid_method", "method: only POST", custom_id)
    url = record.get("url")
    if url not in (GENERATIONS, EDITS):
        raise LineError("invalid_url", f"url: expected {GENERATIONS} or {EDITS}", custom_id)
    body = record.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", "body: a JSON object is required", custom_id)
    return custom_id, url, body


def check_request(job: SampleJob, model: ModelDir, line: int, custom_id: str, url: str,
                  raw: dict[str, Any]) -> LineRequest:
    """The server's checks, in its order (ServiceError for a 4xx line). An edit's image is
    read and fitted here; the actor encodes it."""
    edit = url == EDITS
    try:
        body = (ImageEditJSONRequest.model_validate_json(json.dumps(raw), strict=True)
                if edit else ImageGenerationRequest.model_validate_json(json.dumps(raw)))
    except ValidationError as e:
        raise validation_error(e) from None
    image = mask = None
    if isinstance(body, ImageEditJSONRequest):
        image, mask = edit_references(body, data_url)
    if body.model is not None and body.model not in job.served_names:
        raise ServiceError.model_not_found(body.model, job.served_names)
    if body.stream:
        raise ServiceError(400, "stream: a Batch line is answered whole; leave stream out",
                           param="stream", code="unsupported_in_batch")
    check_count(body.n, job.max_images_per_request, "n")
    if body.priority not in (None, 0):
        raise priority_not_enabled("a batch runs every line; there is no queue to order")
    side = checked_size(body.size, model, job.served_names[0], job.max_output_size, False)
    keep_rows = edit_rows(getattr(body, "keep_rows", None), mask is not None, model.grid_size)
    try:
        options = body.sampling_options(model.gpt.model_type)
    except ValidationError as e:
        raise validation_error(e) from None
    negatives = None if body.negative_prompt is None else [body.negative_prompt]
    check_negative(negatives, options, "negative_prompt")
    if options.greedy:
        seeds: list[int | None] = [None] * body.n
    else:
        base = options.seed if options.seed is not None else job.line_seed(line)
        seeds = [(base + i) % SEED_MODULUS for i in range(body.n)]
    request = LineRequest(line=line, custom_id=custom_id, body=body, options=options,
                          side=side, seeds=seeds, texts=[])
    if model.is_t2i:
        request.texts = [body.prompt, *(negatives or [])]
    else:
        (condition,) = class_conditions(model, [body.prompt], "prompt", indexed=False)
        negative = (None if negatives is None else
                    class_conditions(model, negatives, "negative_prompt", indexed=False)[0])
        request.condition = condition.with_negative(negative)
    if image is not None:
        data, picture, media_type = read_reference(image, "images.0.image_url")
        if mask is not None:
            _, mask_image, _ = read_reference(mask, "mask.image_url")
            keep_rows = rows_above_mask(mask_image, picture, model.image_size, model.grid_size)
        request.edit = EditSource(data, media_type, keep_rows, model.grid_size)
        request.pixels = fit_image(picture, model.image_size)
    return request


def data_url(url: str) -> DataUrl:
    """An edit's image reference, which must be a data: URL (FetchRefused otherwise)."""
    if url.split(":", 1)[0].lower() != "data":
        raise FetchRefused("llamagen sample fetches no URL; give the image as a data: URL "
                           "(data:image/png;base64,...)")
    return DataUrl.parse(url)


def read_reference(source: DataUrl, param: str) -> tuple[bytes, Any, str]:
    """(the image's bytes, the decoded image, its media type), or a 400."""
    try:
        data = source.decode(MAX_INPUT_BYTES)
    except FetchRefused as e:
        raise ServiceError(400, f"{param}: {e}", param=param, code=e.code) from None
    picture, media_type = read_input(data, param, MAX_INPUT_PIXELS)
    return data, picture, media_type


def respond(job: SampleJob, model: ModelDir, request: LineRequest, images: list[Any],
            store: Any) -> dict[str, Any]:
    """The 200 line of a generated request: `images` its pixels, in order; `store`: where
    url-format images go (`Output.put`)."""
    body, condition = request.body, request.condition
    assert condition is not None
    writer = ImageWriter(model, request.options, body.output_format, body.output_compression,
                         None, edit=request.edit, size=request.side)
    kept = None if request.edit is None else request.edit.kept_rows
    data = []
    for i, (pixels, seed) in enumerate(zip(images, request.seeds, strict=True)):
        encoded = writer.encode(pixels, condition, seed)
        image = Image(seed=seed, class_label=condition.label, revised_prompt=condition.caption,
                      kept_rows=kept)
        if body.response_format == "url":
            extension = IMAGE_FORMATS[body.output_format].extension
            where = store.put(f"images/batch-{request.line:06d}-{i}.{extension}", encoded,
                              IMAGE_FORMATS[body.output_format].media_type)
            image.url = where if "://" in where else Path(where).resolve().as_uri()
        else:
            image.b64_json = base64.b64encode(encoded).decode()
        data.append(image)
    response = ImagesResponse(created=int(time.time()), data=data,
                              output_format=body.output_format,
                              size=f"{request.side}x{request.side}",
                              native_size=f"{model.image_size}x{model.image_size}",
                              usage=image_usage(model, [condition] * body.n,
                                                len(request.prefix)))
    return envelope(request.line, job, request.custom_id, status=200,
                    body=response.model_dump(exclude_none=True))
