"""Request and response models of the HTTP APIs.

The OpenAI-compatible shapes follow the openai-python SDK types (ImageGenerateParams,
ImagesResponse, ImageGenStreamEvent, Model); extension fields are optional and documented.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from engine.sampling import SamplingOptions, overrides_model
from server.tenants import PRIORITY_MAX, PRIORITY_MIN
from vq_decoder.encoding import ImageFormat as OutputFormat

# An optional response field: left out when unset (OpenAI's schema has no null there), so
# the documented schema has no null either.
Absent = SkipJsonSchema[None]

# Sampling extension fields, generated from engine.sampling.SamplingOptions (absent: the
# model's default). OpenAI's surface has no `greedy` (temperature 0 means greedy there).
OpenAISampling = overrides_model("OpenAISampling", exclude=("greedy",))
NativeSampling = overrides_model("NativeSampling")


# Variations redraw without a condition (the null one in both guidance streams), so
# guidance changes nothing there and its fields are not offered.
VariationSampling = overrides_model("VariationSampling",
                                    exclude=("greedy", "cfg_scale", "cfg_interval"))


PRIORITY = Field(None, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="extension: vLLM's "
                 "scheduling priority, lower runs first (default: the API key's default "
                 "priority, else 0); needs --scheduling-policy priority unless 0; an API key "
                 "may ask for no more urgent value than its max_priority")


class ImageOutput(BaseModel):
    """The fields every OpenAI image request has: which model, how many images, and how
    they are delivered."""

    model: str | None = None
    n: int = Field(1, ge=1)
    size: str = Field("auto", max_length=64, description="auto (the model's native size) or "
                      "a square WxW: another size is resampled from the native image "
                      "(Lanczos), up to --max-output-size; not square: a 400")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="absent: the server's --default-response-format (both `url` and "
        "`b64_json` unless configured)")
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=256)
    priority: int | None = PRIORITY


NEGATIVE = ("extension: what guidance steers away from, in place of the null condition in "
            "the unguided stream: a class id or name (class-conditional models) or a caption "
            "(text-conditional ones, cleaned and truncated as prompts are); needs guidance "
            "(cfg_scale > 1, the default), else a 400")


class ImageRequest(ImageOutput, OpenAISampling):  # type: ignore[misc, valid-type]
    """The fields OpenAI's generation and edit requests share."""

    prompt: str = Field(min_length=1, max_length=32000)
    negative_prompt: str | None = Field(None, min_length=1, max_length=32000,
                                        description=NEGATIVE)
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    # Accepted for compatibility; a LlamaGen image has one quality and is always opaque.
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto and opaque: the same (LlamaGen images are opaque); "
        "transparent: a 400")
    moderation: Literal["low", "auto"] | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("background")
    @classmethod
    def _opaque(cls, v: str | None) -> str | None:
        if v == "transparent":
            raise ValueError("LlamaGen images have no transparency: give auto or opaque")
        return v


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations. For class-conditional models `prompt` is a class id
    ("207") or name ("golden retriever"); for text-conditional ones it is the caption
    (cleaned and truncated to 120 T5 tokens, as the original does)."""

    # Strict: a JSON type other than the documented one is a 400, never coerced (false as 0,
    # "2" as 2), so the OpenAPI document is the truth.
    model_config = ConfigDict(extra="forbid", strict=True)

    style: Literal["vivid", "natural"] | None = None  # accepted for compatibility


KEEP_ROWS = Field(None, ge=0, description="extension: token rows of the input image kept "
                  "from the top (the rest is redrawn); without a mask the default is half "
                  "the grid; not with `mask`")


class ImageEditRequest(ImageRequest):
    """POST /v1/images/edits, the multipart form's text fields (the files, `image` and
    `mask`, travel beside them). The serving object types the text of each field as the
    schema says ("4.5", "true"), then validates strictly; unknown fields are refused.

    The edit is a completion: the input image's token rows above the redrawn region are kept
    and the rest is generated, conditioned on `prompt` (a class id or name for
    class-conditional models, a caption for text-conditional ones)."""

    model_config = ConfigDict(extra="forbid")

    keep_rows: int | None = KEEP_ROWS
    input_fidelity: Literal["high", "low"] | None = None  # accepted for compatibility


# OpenAI's longest image_url (a 20 MiB base64 data: URL).
MAX_IMAGE_URL = 20_971_520


class ImageRef(BaseModel):
    """An input image by reference: exactly one of `image_url` and `file_id`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_url: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_URL,
                                  description="a data: URL (base64), or an http(s) URL of a "
                                  "host the server allows (--image-url-hosts)")
    file_id: str | None = Field(None, description="not supported here (no Files API): a 400")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of image_url and file_id")
        return self


class ImageEditJSONRequest(ImageEditRequest):
    """POST /v1/images/edits as application/json (OpenAI's `EditImageBodyJsonParam`): the
    input image and mask by reference. An edit completes one picture, so `images` holds
    one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    images: list[ImageRef] = Field(min_length=1, max_length=16)
    mask: ImageRef | None = None


class ImageVariationRequest(ImageOutput, VariationSampling):  # type: ignore[misc, valid-type]
    """POST /v1/images/variations, the multipart form's text fields (beside the `image`
    file): the image's top token rows (`keep_rows`, default half the grid) are kept and the
    rest is redrawn without a condition (the null class or null caption the model was
    trained with), so the picture continues as the model sees fit."""

    model_config = ConfigDict(extra="forbid")

    keep_rows: int | None = KEEP_ROWS

    def sampling_options(self, task: str) -> SamplingOptions:
        # Both guidance streams hold the null condition: guidance is off (cfg_scale 1).
        return super().sampling_options(task).model_copy(update={"cfg_scale": 1.0})


class ImageTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: ImageTokensDetails
    output_tokens: int
    total_tokens: int
    output_tokens_details: ImageTokensDetails | None = None


class Image(BaseModel):
    b64_json: str | Absent = None
    url: str | Absent = None
    revised_prompt: str | Absent = Field(None, description="t2i: the caption after the "
                                         "original's cleaning, as the model saw it")
    # Extensions: what regenerates this exact image.
    seed: int | Absent = None
    class_label: int | Absent = None
    kept_rows: int | Absent = Field(None, description="edits: token rows of the input "
                                    "image kept from the top (the rest was redrawn)")


class ImagesResponse(BaseModel):
    """Sent without its unset fields: OpenAI's schema has no null in them."""

    created: int
    data: list[Image]
    output_format: OutputFormat
    size: str
    native_size: str = Field(description="extension: the size the model drew; `size` is "
                             "the size delivered (resampled when they differ)")
    quality: Literal["high"] = "high"
    background: Literal["opaque"] = "opaque"
    usage: Usage


class _ImageEvent(BaseModel):
    """Fields both OpenAI image stream events carry."""

    b64_json: str
    created_at: int
    size: str
    quality: Literal["high"] = "high"
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    image_index: int = Field(0, description="extension: which of the n images")


class PartialImageEvent(_ImageEvent):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int


class CompletedEvent(_ImageEvent):
    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: Usage
    seed: int | Absent = None
    class_label: int | Absent = None
    revised_prompt: str | Absent = None


class EditPartialImageEvent(PartialImageEvent):
    type: Literal["image_edit.partial_image"] = "image_edit.partial_image"  # type: ignore[assignment]


class EditCompletedEvent(CompletedEvent):
    type: Literal["image_edit.completed"] = "image_edit.completed"  # type: ignore[assignment]
    kept_rows: int = Field(description="extension: token rows of the input image kept")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamagen-serve"
    # Extensions.
    task: Literal["c2i", "t2i"] = Field(description="c2i: prompts are class ids or names; "
                                        "t2i: prompts are captions")
    image_size: int
    grid_size: int = Field(description="token rows (and columns) of an image: edits keep "
                           "0..grid_size-1 of them")
    num_classes: int = Field(description="0 for t2i models")
    max_model_len: int
    root: str | Absent = None
    parent: str | Absent = Field(None, description="a LoRA adapter's: the served model it "
                                 "adapts (vLLM's field)")


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter, vLLM's shape."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/-]+$")
    lora_path: str = Field(min_length=1, max_length=4096, description="a PEFT adapter "
                           "directory on the server")
    base_model_name: str | None = Field(None, description="which served model it adapts "
                                        "(default: the first)")


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter, vLLM's shape."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = Field(None, description="accepted for vLLM compatibility; the "
                                    "name decides")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _exactly_one(*fields: str) -> dict:
    """JSON schema: exactly one of `fields` is given and not null."""
    return {"oneOf": [{"required": [f], "properties": {f: {"type": "array"}},
                       "not": {"anyOf": [{"required": [o], "properties": {o: {"type": "array"}}}
                                         for o in fields if o != f]}}
                      for f in fields]}


class NativeGenerateRequest(NativeSampling):  # type: ignore[misc, valid-type]
    """POST /v1/generate: a batch of images, one per label (c2i models) or per prompt (t2i)."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_exactly_one("labels", "prompts"))

    labels: list[int | str] | None = Field(None, min_length=1,
                                           description="c2i: class ids or names")
    prompts: list[str] | None = Field(None, min_length=1, description="t2i: captions")
    negative_prompt: int | str | None = Field(None, description=NEGATIVE + "; for every "
                                              "image (or `negative_prompts`, one per image)")
    negative_prompts: list[int | str] | None = Field(
        None, min_length=1, description="one negative per label or prompt, as "
        "`negative_prompt`")
    model: str | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    prefix_tokens: list[list[int]] | None = Field(
        None, description="completion: per image (one list per label or prompt), the grid's "
        "first image codes in raster order, kept as they are; the rest is generated "
        "(0 <= length < grid², codes in the codebook)")
    return_tokens: bool = False
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    priority: int | None = PRIORITY

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, v: list[str] | None) -> list[str] | None:
        for i, text in enumerate(v or []):
            if not text.strip():
                raise ValueError(f"prompt {i} must not be empty")
        return v

    @model_validator(mode="after")
    def _labels_or_prompts(self) -> NativeGenerateRequest:
        if (self.labels is None) == (self.prompts is None):
            raise ValueError("give exactly one of labels (c2i models) and prompts (t2i)")
        if self.negative_prompt is not None and self.negative_prompts is not None:
            raise ValueError("give negative_prompt (for every image) or negative_prompts "
                             "(one per image), not both")
        return self

    def negatives(self) -> list[int | str] | None:
        """One negative per image, or None."""
        if self.negative_prompt is not None:
            return [self.negative_prompt] * self.count
        return self.negative_prompts

    @property
    def count(self) -> int:
        return len(self.labels or self.prompts or [])


class ClassList(BaseModel):
    model: str
    classes: list[str]


class NativeImage(BaseModel):
    index: int
    class_label: int | None = None
    class_name: str | None = None
    prompt: str | None = Field(None, description="t2i: the caption as the model saw it")
    negative_prompt: str | None = Field(None, description="the negative the unguided stream "
                                        "saw: a class name, or a caption as the model saw it")
    seed: int | None
    b64_json: str
    tokens: list[int] | None = None
    seconds: float


class NativeGenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    size: str
    output_format: OutputFormat
    images: list[NativeImage]
