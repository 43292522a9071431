"""Requests to the engine: sampling options, prompts, per-image seeds, offline batches.

One vLLM request is one image. Its prompt is the condition: the class token (c2i) or the
projected valid caption rows as prompt embeddings (t2i). Its `extra_args` carry the guidance
settings for the CFG logits processor, and vLLM's own sampler does temperature, top-k,
top-p and seeded sampling. Same-seed samples therefore differ from the reference loop's
`torch.multinomial` (same distribution, other random stream); greedy output is identical.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from model_registry.model_dir import ModelDir
from model_registry.text_encoder import T5_MAX_LENGTH


class SamplingOptions(BaseModel):
    """Per-request sampling settings. Defaults are the original demo's (sample_c2i.py); t2i
    models default to sample_t2i.py's instead (TASK_DEFAULTS)."""

    cfg_scale: float = Field(4.0, ge=0, le=100, description="classifier-free guidance scale; "
                             "<= 1 disables guidance (t2i models: 7.5)")
    cfg_interval: int = Field(-1, ge=-1, description="-1: guide every token; n: guide image "
                              "tokens 0..n+1 only")
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy")
    top_k: int = Field(2000, ge=0, description="0 disables top-k (t2i models: 1000)")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i uses seed + i; "
                             "random when absent")
    greedy: bool = Field(False, description="argmax after guidance (ignores temperature, top-k, "
                         "top-p and seed)")

    @model_validator(mode="after")
    def _greedy_if_zero_temperature(self) -> SamplingOptions:
        if self.temperature == 0:
            self.greedy = True
        return self

    @classmethod
    def for_model(cls, model: ModelDir, **given: Any) -> SamplingOptions:
        """The given fields over the model's task defaults."""
        return cls(**{**TASK_DEFAULTS[model.gpt.model_type], **given})

    def image_seeds(self, n: int) -> list[int]:
        base = self.seed if self.seed is not None else secrets.randbits(62)
        return [(base + i) % 2**63 for i in range(n)]


@dataclass(frozen=True)
class Condition:
    """What one image is conditioned on: a class (c2i) or a caption (t2i)."""

    label: int | None = None
    caption: str | None = None  # t2i: the text the model saw (cleaned, truncated)
    embeds: torch.Tensor | None = None  # t2i: cap_proj of the valid caption rows, (L, dim)

    @property
    def input_tokens(self) -> int:
        return 1 if self.embeds is None else len(self.embeds)

    def prompt(self, model: ModelDir) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        if self.embeds is not None:
            return caption_prompt(self.embeds)
        assert self.label is not None
        return TokensPrompt(prompt_token_ids=class_prompt_ids(model, self.label))


# What the original samplers use where a request says nothing: sample_c2i.py's are the field
# defaults above; sample_t2i.py guides harder and keeps fewer tokens.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"c2i": {}, "t2i": {"cfg_scale": 7.5, "top_k": 1000}}


def class_prompt_ids(model: ModelDir, label: int) -> list[int]:
    if not 0 <= label < model.gpt.num_classes:
        raise ValueError(f"class label {label} out of range 0..{model.gpt.num_classes - 1}")
    return [model.gpt.vocab_size + label]


def caption_prompt(embeds: torch.Tensor) -> dict[str, Any]:
    """A t2i prompt: cap_proj of the valid caption rows, (L, dim), 1 <= L <= 120."""
    from vllm.inputs import EmbedsPrompt

    if not 1 <= len(embeds) <= T5_MAX_LENGTH:
        raise ValueError(f"a caption has 1..{T5_MAX_LENGTH} tokens, got {len(embeds)}")
    # The null stream's KV depends on the slots the caption occupies (120 - L ..), which the
    # embeddings alone do not say: the salt keeps prefix caching from mixing lengths.
    return EmbedsPrompt(prompt_embeds=embeds, cache_salt=f"llamagen-caption-{len(embeds)}")


def engine_prompt(model: ModelDir, condition: int | torch.Tensor,
                  projection: torch.nn.Module | None = None) -> dict[str, Any]:
    """A class label (c2i) or the valid caption features (t2i, (L, caption_dim)) -> prompt."""
    if not model.is_t2i:
        assert isinstance(condition, int)
        return Condition(label=condition).prompt(model)
    assert isinstance(condition, torch.Tensor) and projection is not None
    return Condition(embeds=project_caption(projection, condition)).prompt(model)


@torch.inference_mode()
def project_caption(projection: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Valid caption features (L, caption_dim) -> prompt embeddings (L, dim) on the CPU, in
    the projection's dtype (the engine's, as the original runs cap_proj in the model dtype)."""
    weight = next(projection.parameters())
    # vLLM copies prompt embeddings to the CPU for its request state anyway.
    return projection(features.to(weight.device, weight.dtype)).cpu()


def sampling_params(model: ModelDir, options: SamplingOptions, seed: int | None,
                    **kwargs: Any) -> Any:
    """vLLM SamplingParams for one image (kwargs: e.g. output_kind for streaming)."""
    from vllm import SamplingParams

    codebook = model.gpt.vocab_size
    top_k = options.top_k if 0 < options.top_k < codebook else 0
    return SamplingParams(
        n=1,
        max_tokens=model.gpt.block_size,
        ignore_eos=True,
        detokenize=False,
        temperature=0.0 if options.greedy else options.temperature,
        top_k=0 if options.greedy else top_k,
        top_p=1.0 if options.greedy else options.top_p,
        seed=None if options.greedy else seed,
        extra_args={"cfg_scale": options.cfg_scale, "cfg_interval": options.cfg_interval},
        **kwargs,
    )


class OfflineGenerator:
    """Batch generation with an in-process vLLM engine (the CLI and the benchmarks)."""

    def __init__(self, model: ModelDir, llm: Any):
        self.model, self.llm = model, llm
        self.projection = (model.caption_projection(llm.llm_engine.model_config.dtype)
                           if model.is_t2i else None)

    def generate(self, conditions: Sequence[int] | Sequence[torch.Tensor],
                 options: SamplingOptions) -> tuple[list[list[int]], list[int]]:
        """Class labels (c2i) or valid caption features (t2i) -> (tokens per image in order,
        the seed each image used)."""
        seeds = options.image_seeds(len(conditions))
        prompts = [engine_prompt(self.model, c, self.projection) for c in conditions]
        params = [sampling_params(self.model, options, seed) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        for t in tokens:
            if len(t) != self.model.gpt.block_size:
                raise RuntimeError(f"engine returned {len(t)} tokens, expected "
                                   f"{self.model.gpt.block_size}")
        return tokens, seeds


def image_provenance(model: ModelDir, options: SamplingOptions, seed: int | None,
                     condition: Condition) -> dict[str, Any]:
    from model_registry.convert import software_version
    from vq_decoder.encoding import provenance

    sampling = options.model_dump(exclude={"seed"})
    label = condition.label
    return provenance(model=model.name, checkpoint_sha256=model.gpt_sha256,
                      seed=None if options.greedy else seed, sampling=sampling,
                      software=f"llamagen-serve {software_version()}", label=label,
                      class_name=None if label is None else model.class_names[label],
                      prompt=condition.caption)


def save_images(model: ModelDir, tokens: Sequence[Sequence[int]],
                conditions: Sequence[Condition], seeds: Sequence[int],
                options: SamplingOptions, out_dir: Path, *, fmt: str = "png",
                compression: int | None = None, batch_size: int = 32) -> list[Path]:
    """Decode token grids and write exactly one file per image, `{index:04d}_{label}.{ext}`
    (c2i) or `{index:04d}.{ext}` (t2i), each carrying its provenance."""
    from vq_decoder.encoding import encode_image

    decoder = model.vq_decoder()
    grid = model.grid_size
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if fmt == "jpeg" else fmt
    paths = []
    for start in range(0, len(tokens), batch_size):
        codes = torch.tensor(tokens[start: start + batch_size]).view(-1, grid, grid)
        for offset, pixels in enumerate(decoder.decode_uint8(codes).numpy()):
            i = start + offset
            condition = conditions[i]
            data = encode_image(pixels, fmt,  # type: ignore[arg-type]
                                metadata=image_provenance(model, options, seeds[i], condition),
                                compression=compression)
            stem = f"{i:04d}" if condition.label is None else f"{i:04d}_{condition.label}"
            path = out_dir / f"{stem}.{ext}"
            path.write_bytes(data)
            paths.append(path)
    return paths
