"""What an image is conditioned on, and the engine prompt it becomes.

One vLLM request is one image. Its prompt is the condition: the class token (c2i) or the
projected valid caption rows as prompt embeddings (t2i), followed, for a completion (an
edit), by the grid's first image codes. The server, the offline generator,
the CLI and the benchmarks all hand the engine `Condition`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.vllm_api import embeds_prompt, token_prompt
from model_registry.model_dir import ModelDir
from model_registry.text_encoder import TextEncoder


@dataclass(frozen=True)
class Condition:
    """A class (c2i) or a caption (t2i), or, `unconditional`, the null condition the model
    was trained with (the null class; for t2i the null caption's embeddings): variations."""

    label: int | None = None
    caption: str | None = None  # t2i: the text the model saw (cleaned, truncated)
    embeds: torch.Tensor | None = None  # t2i: cap_proj of the valid caption rows, (L, dim)
    unconditional: bool = False

    @classmethod
    def null(cls, model: ModelDir, projection: torch.nn.Module | None = None) -> Condition:
        """The null condition in the conditional stream too (t2i: `projection`, cap_proj in
        the engine's dtype, makes the null caption's embeddings)."""
        if not model.is_t2i:
            return cls(unconditional=True)
        assert projection is not None
        return cls(embeds=project_caption(projection, model.null_caption()), unconditional=True)

    @property
    def input_tokens(self) -> int:
        """The prompt's tokens a client sent (a variation's null condition: none)."""
        if self.unconditional:
            return 0
        return 1 if self.embeds is None else len(self.embeds)

    def prompt(self, model: ModelDir, prefix: Sequence[int] = ()) -> Any:
        """The engine prompt: the condition, then `prefix` (the grid's first image codes,
        checked by `check_prefix`) for a completion."""
        if self.embeds is not None:
            return embeds_prompt(self.embeds, model.gpt.vocab_size, prefix)
        if self.unconditional:
            return token_prompt([model.gpt.vocab_size + model.gpt.null_class, *prefix])
        assert self.label is not None
        return token_prompt(class_prompt_ids(model, self.label) + list(prefix))

    def describe(self, model: ModelDir) -> dict[str, Any]:
        """What an image's provenance says of its condition."""
        if self.unconditional:
            return {"unconditional": True}
        if self.label is None:
            return {"prompt": self.caption}
        return {"label": self.label, "class_name": model.class_names[self.label]}


def check_prefix(model: ModelDir, prefix: Sequence[int]) -> list[int]:
    """A completion's prefix: 0 <= P < grid² image codes, each in the codebook (ValueError
    saying which is not)."""
    codes, limit = model.gpt.vocab_size, model.gpt.block_size
    if len(prefix) >= limit:
        raise ValueError(f"a prefix holds at most {limit - 1} tokens (the grid has {limit}), "
                         f"got {len(prefix)}")
    for i, t in enumerate(prefix):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < codes:
            raise ValueError(f"prefix token {i} is {t!r}, not an image code in 0..{codes - 1}")
    return list(prefix)


def class_prompt_ids(model: ModelDir, label: int) -> list[int]:
    if not 0 <= label < model.gpt.num_classes:
        raise ValueError(f"class label {label} out of range 0..{model.gpt.num_classes - 1}")
    return [model.gpt.vocab_size + label]


@torch.inference_mode()
def project_caption(projection: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Valid caption features (L, caption_dim) -> prompt embeddings (L, dim) on the CPU, in
    the projection's dtype (the engine's, as the original runs cap_proj in the model dtype)."""
    weight = next(projection.parameters())
    # vLLM copies prompt embeddings to the CPU for its request state anyway.
    return projection(features.to(weight.device, weight.dtype)).cpu()


def caption_conditions(encoder: TextEncoder, projection: torch.nn.Module,
                       texts: Sequence[str]) -> list[Condition]:
    """Captions -> conditions: the original's cleaning, T5, then the caption projection."""
    return [Condition(caption=c.text, embeds=project_caption(projection, c.features))
            for c in encoder.encode(list(texts))]
