"""What an image is conditioned on, and the engine prompt it becomes.

One vLLM request is one image. Its prompt is the condition: the class token (c2i) or the
projected valid caption rows as prompt embeddings (t2i), followed, for a completion (an
edit), by the grid's first image codes. The server, the offline generator,
the CLI and the benchmarks all hand the engine `Condition`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    # What the unguided stream sees instead of the null condition (guidance away from it):
    # a class (c2i) or a caption (t2i), itself a Condition without a negative.
    negative: Condition | None = None

    def with_negative(self, negative: Condition | None) -> Condition:
        return self if negative is None else replace(self, negative=negative)

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
        """The prompt's tokens a client sent, a negative's included (a variation's null
        condition: none)."""
        if self.unconditional:
            return 0
        own = 1 if self.embeds is None else len(self.embeds)
        return own + (0 if self.negative is None else self.negative.input_tokens)

    def prompt(self, model: ModelDir, prefix: Sequence[int] = (),
               null: torch.Tensor | None = None) -> Any:
        """The engine prompt: the condition, then `prefix` (the grid's first image codes,
        checked by `check_prefix`) for a completion. t2i: `null` is the projected null
        caption (120, dim), `null_rows`, that the unguided stream sees without a negative."""
        if self.embeds is not None:
            assert null is not None, "a t2i prompt needs the projected null caption"
            cond, uncond = stream_rows(self.embeds, null, self.negative)
            return embeds_prompt(cond, uncond, model.gpt.vocab_size, prefix)
        if self.unconditional:
            return token_prompt([model.gpt.vocab_size + model.gpt.null_class, *prefix])
        assert self.label is not None
        negative = None if self.negative is None else self.negative.label
        return token_prompt(class_prompt_ids(model, self.label, negative) + list(prefix))

    def describe(self, model: ModelDir) -> dict[str, Any]:
        """What an image's provenance says of its condition."""
        if self.unconditional:
            return {"unconditional": True}
        if self.label is None:
            described: dict[str, Any] = {"prompt": self.caption}
        else:
            described = {"label": self.label, "class_name": model.class_names[self.label]}
        if self.negative is not None:
            neg = self.negative
            described["negative"] = ({"prompt": neg.caption} if neg.label is None else
                                     {"label": neg.label,
                                      "class_name": model.class_names[neg.label]})
        return described


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


def class_prompt_ids(model: ModelDir, label: int, negative: int | None = None) -> list[int]:
    """The class token: `codebook_size + label`; with a negative class n, the pair's id
    `codebook_size + label + (num_classes + 1) * (n + 1)`, which the model reads as `label`
    in the guided stream and `n` in the unguided one (`model_registry.vllm_model`)."""
    classes = model.gpt.num_classes
    for value in (label, negative):
        if value is not None and not 0 <= value < classes:
            raise ValueError(f"class label {value} out of range 0..{classes - 1}")
    pair = 0 if negative is None else (classes + 1) * (negative + 1)
    return [model.gpt.vocab_size + label + pair]


def stream_rows(embeds: torch.Tensor, null: torch.Tensor, negative: Condition | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """t2i: the condition rows of both streams, (M, dim) each.

    Without a negative, the guided stream holds the caption's L rows and the unguided one
    the null caption's rows at the same slots (120-L..119), as the original. With a negative
    caption of N rows, both streams span M = max(L, N) slots: the original gives the two
    halves one mask, so each caption is left-padded to M with T5's padding (zero features,
    which cap_proj maps to zero rows) and those slots are seen. A negative no longer than
    the caption leaves the guided stream exactly as without one."""
    if negative is None:
        return embeds, null[len(null) - len(embeds):].to(embeds.dtype)
    assert negative.embeds is not None
    neg = negative.embeds.to(embeds.dtype)
    M = max(len(embeds), len(neg))

    def padded(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows.new_zeros(M - len(rows), rows.shape[1]), rows])

    return padded(embeds), padded(neg)


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
