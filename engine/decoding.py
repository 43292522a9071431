"""The decoder service: micro-batches decode requests from many concurrent generations.

Requests with the same grid shape (rows x columns; a preview has fewer rows) are decoded
together, up to `max_batch_size`, waiting at most `max_wait_s` for a batch to fill; shapes
never mix. Decoding runs on one worker thread, so the event loop stays free and the device
(or the CPU thread budget) is never shared by two decodes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from vq_decoder.decoder import VQDecoder

BatchObserver = Callable[[int, float], None]  # (batch size, seconds)


@dataclass
class _Job:
    codes: torch.Tensor  # (rows, columns)
    future: asyncio.Future[np.ndarray]
    arrived: float = field(default_factory=time.monotonic)


class DecoderService:
    def __init__(self, decoder: VQDecoder, *, max_batch_size: int = 32,
                 max_wait_s: float = 0.005, cpu_threads: int | None = None,
                 on_batch: BatchObserver | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.decoder = decoder
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.cpu_threads, self.on_batch = cpu_threads, on_batch
        self._pending: dict[tuple[int, int], list[_Job]] = {}
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vq-decoder")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.decoder.device.type == "cpu" and self.cpu_threads:
            # Process-wide: in the server the vLLM worker lives in its own process.
            torch.set_num_threads(self.cpu_threads)
        self._task = asyncio.create_task(self._run(), name="vq-decoder-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for jobs in self._pending.values():
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("decoder service stopped"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    async def decode(self, tokens: Sequence[int] | torch.Tensor, columns: int) -> np.ndarray:
        """Raster-order tokens covering whole rows of a grid `columns` wide -> uint8
        (rows*ds, columns*ds, 3). Fewer rows than the model's grid give a preview of the top."""
        if self._task is None:
            raise RuntimeError("decoder service not started")
        codes = torch.as_tensor(tokens, dtype=torch.long)
        if codes.numel() == 0 or codes.numel() % columns:
            raise ValueError(f"{codes.numel()} tokens do not fill whole rows of {columns}")
        codes = codes.view(-1, columns)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(tuple(codes.shape), []).append(_Job(codes, future))
        self._wakeup.set()
        return await future

    def _next_batch(self) -> list[_Job] | None:
        """The full batch of any shape, else the shape whose oldest job waited max_wait_s."""
        now = time.monotonic()
        ready = [key for key, jobs in self._pending.items()
                 if len(jobs) >= self.max_batch_size or now - jobs[0].arrived >= self.max_wait_s]
        if not ready:
            return None
        key = min(ready, key=lambda k: self._pending[k][0].arrived)
        jobs = self._pending[key]
        batch, rest = jobs[: self.max_batch_size], jobs[self.max_batch_size:]
        if rest:
            self._pending[key] = rest
        else:
            del self._pending[key]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._next_batch()
            if batch is None:
                oldest = min(jobs[0].arrived for jobs in self._pending.values())
                self._wakeup.clear()
                delay = max(0.0, oldest + self.max_wait_s - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
                continue
            batch = [job for job in batch if not job.future.cancelled()]
            if not batch:
                continue
            codes = torch.stack([job.codes for job in batch])
            start = time.perf_counter()
            try:
                images = await loop.run_in_executor(self._executor,
                                                    self.decoder.decode_uint8, codes)
            except Exception as e:  # a bad batch fails its requests, not the service
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            for job, image in zip(batch, images.numpy(), strict=True):
                if not job.future.done():
                    job.future.set_result(image)
