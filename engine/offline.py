"""Offline generation: batches of conditions through an in-process vLLM engine (the CLI, the
benchmarks and the demo evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.adapters import Adapter
from engine.conditions import Condition, caption_conditions, check_prefix, project_caption
from engine.sampling import SamplingOptions
from engine.vllm_api import generate_offline, llm_dtype, sampling_params
from model_registry.model_dir import ModelDir


class OfflineGenerator:
    def __init__(self, model: ModelDir, llm: Any):
        self.model, self.llm = model, llm
        # t2i: the caption projection runs in the engine's dtype, as the original's cap_proj.
        self.projection = (model.caption_projection(llm_dtype(llm)) if model.is_t2i else None)
        # What the unguided stream sees without a negative caption.
        self.null = (None if self.projection is None
                     else project_caption(self.projection, model.null_caption()))

    def generate(self, conditions: Sequence[Condition],
                 options: SamplingOptions | Sequence[SamplingOptions],
                 prefixes: Sequence[Sequence[int]] | None = None,
                 adapters: Sequence[Adapter | None] | Adapter | None = None,
                 seeds: Sequence[int | None] | None = None
                 ) -> tuple[list[list[int]], list[int | None]]:
        """Conditions -> (the token grid per image in order, the seed each image used).

        `prefixes`: one per condition, the grid's first image codes to complete from (an
        empty one generates the whole grid); the returned grids include them. `adapters`:
        a LoRA adapter for every image, or one per image (None: the base), on an engine
        built with enable_lora. `options` and `seeds`: one for all images or one per image
        (default seeds: `options.image_seeds`, image i seed + i)."""
        prefixes = [check_prefix(self.model, p) for p in prefixes or [[]] * len(conditions)]
        if len(prefixes) != len(conditions):
            raise ValueError(f"{len(prefixes)} prefixes for {len(conditions)} conditions")
        if isinstance(options, SamplingOptions):
            seeds = options.image_seeds(len(conditions)) if seeds is None else list(seeds)
            options = [options] * len(conditions)
        elif seeds is None:
            raise ValueError("per-image options need per-image seeds")
        if not len(options) == len(seeds) == len(conditions):
            raise ValueError(f"{len(options)} options and {len(seeds)} seeds for "
                             f"{len(conditions)} conditions")
        prompts = [c.prompt(self.model, p, self.null)
                   for c, p in zip(conditions, prefixes, strict=True)]
        params = [sampling_params(self.model, o, seed, prefix_len=len(p))
                  for o, seed, p in zip(options, seeds, prefixes, strict=True)]
        if adapters is None or isinstance(adapters, Adapter):
            adapters = [adapters] * len(conditions)
        loras = None if all(a is None for a in adapters) else \
            [None if a is None else a.request for a in adapters]
        grids = [p + t for p, t in zip(prefixes, generate_offline(self.llm, prompts, params,
                                                                  loras), strict=True)]
        for grid in grids:
            if len(grid) != self.model.gpt.block_size:
                raise RuntimeError(f"engine returned {len(grid)} tokens, expected "
                                   f"{self.model.gpt.block_size}")
        return grids, list(seeds)

    def _projection(self) -> torch.nn.Module:
        if self.projection is None:
            raise ValueError(f"{self.model.name} is not a text-conditional model")
        return self.projection

    def captions(self, texts: Sequence[str]) -> list[Condition]:
        """t2i: captions -> conditions (the model's text encoder, then its projection)."""
        return caption_conditions(self.model.load_text_encoder(), self._projection(), texts)

    def caption_features(self, features: Sequence[torch.Tensor]) -> list[Condition]:
        """t2i: T5 features of each caption's valid tokens, (L, caption_dim) -> conditions."""
        return [Condition(embeds=project_caption(self._projection(), f)) for f in features]
