"""Classifier-free guidance as a vLLM V1 logits processor.

The LlamaGen vLLM model runs each image's conditional and unconditional streams inside one
sequence and returns `[num_reqs, 2 * codebook_size]` logits (cond | uncond). This processor
turns every row into guided logits over the codebook, per request:

    logits = uncond + cfg_scale * (cond - uncond)      while guidance is on
    logits = cond                                      with cfg_scale <= 1 or past cfg_interval

and masks the second half to -inf, so an id >= codebook_size can never be sampled. Guidance is
applied to raw logits, before vLLM's temperature, top-k and top-p, as in the original.

Per-request parameters travel in `SamplingParams.extra_args`: `cfg_scale` (float >= 0,
default 1.0) and `cfg_interval` (int >= -1, default -1: guide every token; n: guide image
tokens 0..n+1, as the original `generate()`). A prompt that ends with P image codes (a
completion) counts them as generated: its first new token is image token P.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

if TYPE_CHECKING:
    from vllm.config import VllmConfig

def guidance_args(extra_args: dict[str, Any] | None) -> tuple[float, int]:
    """(cfg_scale, cfg_interval) from extra_args, validated."""
    extra_args = extra_args or {}
    scale = extra_args.get("cfg_scale", 1.0)
    interval = extra_args.get("cfg_interval", -1)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) \
            or scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {scale!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or not -1 <= interval < 2**31:
        raise ValueError(f"cfg_interval must be an integer in -1..2**31-1, got {interval!r}")
    return float(scale), interval


class CFGLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        gpt = vllm_config.model_config.hf_config.llamagen["gpt"]
        self.codebook_size: int = gpt["vocab_size"]
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self.device = device
        # Host-side state per persistent-batch slot; a slot's output list is the request's live
        # list of generated tokens (vLLM keeps it current, with placeholders when async).
        self.scale = np.ones(max_reqs, dtype=np.float32)
        self.interval = np.full(max_reqs, -1, dtype=np.int64)
        self.prefix = np.zeros(max_reqs, dtype=np.int64)  # image codes in the prompt
        self.outputs: list[list[int] | None] = [None] * max_reqs

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        guidance_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        # Guidance changes the argmax, so vLLM must apply it before greedy sampling too.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.scale[index], self.interval[index], self.outputs[index] = 1.0, -1, None
            self.prefix[index] = 0
        for index, params, prompt_ids, output_ids in batch_update.added:
            self.scale[index], self.interval[index] = guidance_args(params.extra_args)
            self.outputs[index] = output_ids
            # Class tokens and t2i caption placeholders are >= codebook_size.
            self.prefix[index] = sum(1 for t in prompt_ids or () if t < self.codebook_size)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.scale[[a, b]] = self.scale[[b, a]]
                self.interval[[a, b]] = self.interval[[b, a]]
                self.prefix[[a, b]] = self.prefix[[b, a]]
                self.outputs[a], self.outputs[b] = self.outputs[b], self.outputs[a]
            else:
                self.scale[b], self.interval[b], self.outputs[b], self.prefix[b] = (
                    self.scale[a], self.interval[a], self.outputs[a], self.prefix[a])
                self.scale[a], self.interval[a], self.outputs[a] = 1.0, -1, None
                self.prefix[a] = 0

    def _guided_rows(self, n: int) -> np.ndarray:
        guided = self.scale[:n] > 1.0
        for i in np.flatnonzero(guided & (self.interval[:n] >= 0)):
            # Image token t (0-based) is guided while t <= cfg_interval + 1.
            t = self.prefix[i] + len(self.outputs[i] or ())
            guided[i] = t <= self.interval[i] + 1
        return guided

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        n, C = logits.shape[0], self.codebook_size
        cond, uncond = logits[:, :C], logits[:, C: 2 * C]
        guided = self._guided_rows(n)
        if guided.any():
            scale = torch.from_numpy(self.scale[:n]).to(logits.device, non_blocking=True)
            mask = torch.from_numpy(guided).to(logits.device, non_blocking=True)
            mixed = uncond + (cond - uncond) * scale[:, None]
            # Unguided rows keep `cond` bit for bit (u + 1 * (c - u) may round differently).
            cond.copy_(torch.where(mask[:, None], mixed, cond))
        logits[:, C:] = -float("inf")
        return logits
