"""The micro-batcher: work from many concurrent requests, run in batches on one worker thread.

A job is a list of items that stay together (one request's captions, one token grid). Jobs
with the same key may share a batch; keys never mix (the decoder keys grids by shape and by
preview or final). A key's jobs run when they fill `max_batch_size` items or the oldest
has waited `max_wait_s`; of the keys ready, the lowest `priority` first, then the oldest (the
decoder's finished images go before its previews); a job larger than a batch runs alone.
Batches run on one worker thread, so the event loop stays free and the device (or the CPU
thread budget) is never shared by two batches at once. A failing batch fails its own jobs,
not the batcher; should the batcher itself fail, every job waiting on it fails and `alive`
turns False (the service's health check reports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
BatchObserver = Callable[[int, float], None]  # (items in the batch, seconds)


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Sequence[R]], *, name: str,
                 max_batch_size: int, max_wait_s: float,
                 on_batch: BatchObserver | None = None):
        """run: a batch's items -> one result per item, in order (called on the worker)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._fn, self.name = run, name
        self.max_batch_size, self.max_wait_s, self.on_batch = max_batch_size, max_wait_s, on_batch
        self._pending: dict[Hashable, deque[_Job[T, R]]] = {}
        self._priority: dict[Hashable, int] = {}
        self._running: list[_Job[T, R]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")
        self._task.add_done_callback(self._on_exit)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        """The loop ended other than by stop(): nothing would ever answer the waiting jobs."""
        if task.cancelled():
            return
        error = task.exception() or RuntimeError(f"{self.name} ended")
        jobs = self._running + [job for jobs in self._pending.values() for job in jobs]
        self._fail(jobs, RuntimeError(f"{self.name} failed: {error!r}"))
        self._running, self._pending = [], {}

    async def stop(self) -> None:
        """Stop batching; jobs waiting or running fail with "... stopped"."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        jobs = self._running + [job for jobs in self._pending.values() for job in jobs]
        self._fail(jobs, RuntimeError(f"{self.name} stopped"))
        self._running, self._pending = [], {}
        self._executor.shutdown(wait=True)

    async def submit(self, items: Sequence[T], key: Hashable = None, priority: int = 0
                     ) -> list[R]:
        """One result per item, computed in a batch with other callers' items of the same key
        (a key's priority is the one its jobs are submitted with)."""
        if not self.alive:
            raise RuntimeError(f"{self.name} is not running")
        if not items:
            return []
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, deque()).append(_Job(list(items), future))
        self._priority[key] = priority
        self._wakeup.set()
        return await future

    @staticmethod
    def _fail(jobs: list[_Job[Any, Any]], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _next_batch(self) -> list[_Job[T, R]] | None:
        now = time.monotonic()
        ready = [key for key, jobs in self._pending.items()
                 if sum(len(job.items) for job in jobs) >= self.max_batch_size
                 or now - jobs[0].arrived >= self.max_wait_s]
        if not ready:
            return None
        key = min(ready, key=lambda k: (self._priority[k], self._pending[k][0].arrived))
        jobs = self._pending[key]
        batch, size = [], 0
        while jobs and (not batch or size + len(jobs[0].items) <= self.max_batch_size):
            job = jobs.popleft()
            batch.append(job)
            size += len(job.items)
        if not jobs:
            del self._pending[key], self._priority[key]
        return batch

    def _wait_s(self) -> float | None:
        """How long until the oldest waiting job is due (None: nothing waits)."""
        if not self._pending:
            return None
        oldest = min(jobs[0].arrived for jobs in self._pending.values())
        return max(0.0, oldest + self.max_wait_s - time.monotonic())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch()
            if batch is None:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self._wait_s())
                continue
            batch = [job for job in batch if not job.future.cancelled()]
            if not batch:
                continue
            items = [item for job in batch for item in job.items]
            self._running = batch  # kept if stop() cancels us: it fails these jobs
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
            except Exception as e:
                self._running = []
                self._fail(batch, e)
                continue
            self._running = []
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - start)
            for job in batch:
                done, results = results[: len(job.items)], results[len(job.items):]
                if not job.future.done():
                    job.future.set_result(list(done))
