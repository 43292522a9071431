"""The caption service of a t2i model: prompts -> engine conditions.

Prompts from concurrent requests are encoded together in micro-batches (`engine.batching`);
one request's prompts always stay in one batch. The caption projection (`cap_proj`) runs
there too, in the engine's dtype, so the engine receives prompt embeddings.
"""

from __future__ import annotations

import torch

from engine.batching import BatchObserver, MicroBatcher
from engine.conditions import Condition, caption_conditions
from model_registry.text_encoder import TextEncoder


class CaptionService:
    def __init__(self, encoder: TextEncoder, projection: torch.nn.Module, *,
                 max_batch_size: int = 32, max_wait_s: float = 0.002,
                 on_batch: BatchObserver | None = None):
        self._batcher: MicroBatcher[str, Condition] = MicroBatcher(
            lambda texts: caption_conditions(encoder, projection, texts),
            name="caption service", max_batch_size=max_batch_size, max_wait_s=max_wait_s,
            on_batch=on_batch)

    async def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    @property
    def alive(self) -> bool:
        return self._batcher.alive

    async def encode(self, texts: list[str]) -> list[Condition]:
        return await self._batcher.submit(texts)
