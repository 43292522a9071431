"""The caption service of a t2i model: prompts -> engine conditions.

Prompts from concurrent requests are encoded together: T5 runs on one worker thread in
micro-batches of up to `max_batch_size` captions, waiting at most `max_wait_s` for a batch to
fill (one request's prompts always stay in one batch). The caption projection (`cap_proj`)
runs there too, in the engine's dtype, so the engine receives prompt embeddings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from model_registry.text_encoder import TextEncoder
from server.generation import Condition, project_caption


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[list[Condition]]


class CaptionService:
    def __init__(self, encoder: TextEncoder, projection: torch.nn.Module, *,
                 max_batch_size: int = 32, max_wait_s: float = 0.002,
                 on_batch: Callable[[int, float], None] | None = None):
        self.encoder, self.projection = encoder, projection
        self.max_batch_size, self.max_wait_s, self.on_batch = max_batch_size, max_wait_s, on_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t5-encoder")
        self._task: asyncio.Task[None] | None = None
        self._carry: _Job | None = None  # the job that did not fit the last batch
        self._running: list[_Job] = []  # the batch being encoded

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="caption-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        jobs = self._running + ([self._carry] if self._carry else [])
        while not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("caption service stopped"))
        self._executor.shutdown(wait=True)

    async def encode(self, texts: list[str]) -> list[Condition]:
        if self._task is None:
            raise RuntimeError("caption service not started")
        future: asyncio.Future[list[Condition]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(list(texts), future))
        return await future

    def _encode(self, texts: list[str]) -> list[Condition]:
        return [Condition(caption=c.text, embeds=project_caption(self.projection, c.features))
                for c in self.encoder.encode(texts)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first, self._carry = self._carry or await self._queue.get(), None
            batch = self._running = [first]
            size = len(batch[0].texts)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except TimeoutError:
                    break
                if size + len(job.texts) > self.max_batch_size:
                    self._carry = job  # a request's prompts stay together: next batch
                    break
                batch.append(job)
                size += len(job.texts)
            batch = [job for job in batch if not job.future.cancelled()]
            if not batch:
                continue
            texts = [t for job in batch for t in job.texts]
            start = time.perf_counter()
            self._running = batch
            try:
                conditions = await loop.run_in_executor(self._executor, self._encode, texts)
            except Exception as e:  # a bad batch fails its requests, not the service
                self._running = []
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self._running = []  # (kept on cancellation: stop() fails those requests)
            if self.on_batch is not None:
                self.on_batch(len(texts), time.perf_counter() - start)
            for job in batch:
                done, conditions = conditions[: len(job.texts)], conditions[len(job.texts):]
                if not job.future.done():
                    job.future.set_result(done)

