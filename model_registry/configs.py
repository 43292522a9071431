"""LlamaGen configurations: the GPT `ModelArgs`, the model zoo and the released checkpoints.

Field names are the original `autoregressive/models/gpt.py::ModelArgs` names, so a JSON config
written for the original code describes the same model here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vq_decoder.vq_model import VQ_MODELS, VQConfig


class ConfigError(ValueError):
    """A model name or JSON config that does not describe a model."""


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    # Present in the original ModelArgs but unused by it; accepted so its JSON round-trips.
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ConfigError(f"model_type must be 'c2i' or 't2i', not {self.model_type!r}")
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_kv_head is not None and self.n_kv_head != self.n_head:
            # No released LlamaGen uses GQA; the dual-stream KV layout assumes n_kv_head == n_head.
            raise ConfigError("n_kv_head different from n_head is not supported")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ConfigError(f"block_size {self.block_size} is not a square token grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def null_class(self) -> int:
        """The class id of the unconditional stream (the extra embedding row)."""
        return self.num_classes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown GPT config field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Head sizes the paged-attention backends (CPU and CUDA) all accept. GPT-3B's head_dim 100 is
# zero-padded to 112 as the upstream port did; padding q, k and v with zeros leaves q·k and the
# first head_dim output channels unchanged.
ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def padded_head_size(head_dim: int) -> int:
    for size in ATTENTION_HEAD_SIZES:
        if size >= head_dim:
            return size
    raise ValueError(f"head_dim {head_dim} exceeds the largest supported size 256")


# gpt.py `GPT_models`: the architecture of each size; task fields come from `task_config`.
GPT_MODELS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}


def task_config(model_type: str, image_size: int, downsample: int = 16) -> dict[str, Any]:
    """The fields the sample scripts set per task: condition length and token grid."""
    if image_size % downsample:
        raise ConfigError(f"image size {image_size} is not a multiple of {downsample}")
    block_size = (image_size // downsample) ** 2
    if model_type == "c2i":
        return dict(model_type="c2i", cls_token_num=1, block_size=block_size)
    if model_type == "t2i":
        return dict(model_type="t2i", cls_token_num=120, block_size=block_size)
    raise ConfigError(f"unknown model_type {model_type!r}")


@dataclass(frozen=True)
class Release:
    """An official checkpoint file and how the samplers load it."""

    gpt_model: str
    model_type: str
    image_size: int
    filename: str
    repo_id: str
    vq_filename: str
    from_fsdp: bool = False
    vq_model: str = "VQ-16"
    notes: str = ""


LLAMAGEN_REPO = "FoundationVision/LlamaGen"
T2I_REPO = "peizesun/llamagen_t2i"

RELEASES: dict[str, Release] = {
    r.filename.removesuffix(".pt"): r
    for r in [
        Release("GPT-B", "c2i", 256, "c2i_B_256.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt"),
        Release("GPT-B", "c2i", 384, "c2i_B_384.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt"),
        Release("GPT-L", "c2i", 256, "c2i_L_256.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt"),
        Release("GPT-L", "c2i", 384, "c2i_L_384.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt"),
        Release("GPT-XL", "c2i", 384, "c2i_XL_384.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt"),
        Release("GPT-XXL", "c2i", 384, "c2i_XXL_384.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt",
                from_fsdp=True),
        Release("GPT-3B", "c2i", 384, "c2i_3B_384.pt", LLAMAGEN_REPO, "vq_ds16_c2i.pt",
                from_fsdp=True, notes="head_dim 100, padded to 112 for paged attention"),
        Release("GPT-XL", "t2i", 256, "t2i_XL_stage1_256.pt", T2I_REPO, "vq_ds16_t2i.pt"),
        Release("GPT-XL", "t2i", 512, "t2i_XL_stage2_512.pt", T2I_REPO, "vq_ds16_t2i.pt"),
    ]
}

VQ_RELEASES: dict[str, tuple[str, str]] = {
    "vq_ds16_c2i.pt": ("VQ-16", LLAMAGEN_REPO),
    "vq_ds8_c2i.pt": ("VQ-8", LLAMAGEN_REPO),
    "vq_ds16_t2i.pt": ("VQ-16", T2I_REPO),
}


def _load_json_or_name(spec: str | Path, kind: str) -> dict[str, Any] | None:
    """A JSON file path or inline JSON object; None when `spec` should be a zoo name."""
    text = str(spec)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid inline {kind} JSON: {e}") from None
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{kind} config file not found: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid {kind} config {path}: {e}") from None
    return None


def resolve_gpt_config(spec: str | Path, image_size: int | None = None,
                       model_type: str = "c2i", **overrides: Any) -> GPTConfig:
    """A zoo name (`GPT-B`), a JSON file or an inline JSON object -> GPTConfig.

    A zoo name needs `image_size` to fix the token grid; a JSON config carries its own
    `block_size` (an `image_size` given as well must agree with it).
    """
    d = _load_json_or_name(spec, "GPT")
    if d is None:
        if str(spec) not in GPT_MODELS:
            raise ConfigError(
                f"unknown GPT model {str(spec)!r}; choose one of {', '.join(GPT_MODELS)} "
                "or give a JSON config")
        if image_size is None:
            raise ConfigError(f"{spec} needs an image size")
        d = {**GPT_MODELS[str(spec)], **task_config(model_type, image_size)}
    return GPTConfig.from_dict({**d, **overrides})


def resolve_vq_config(spec: str | Path) -> VQConfig:
    d = _load_json_or_name(spec, "VQ")
    if d is None:
        if str(spec) not in VQ_MODELS:
            raise ConfigError(
                f"unknown VQ model {str(spec)!r}; choose one of {', '.join(VQ_MODELS)} "
                "or give a JSON config")
        return VQ_MODELS[str(spec)]
    try:
        return VQConfig.from_dict(d)
    except ValueError as e:
        raise ConfigError(str(e)) from None
