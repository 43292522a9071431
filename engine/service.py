"""The generation service of one served model: the vLLM engine + the VQ decoder service (+ the
caption service for t2i models).

One vLLM request per image (prompt = the class token or the caption's embeddings); token
deltas stream back, previews are real decodes of the rows generated so far (in a whole grid,
the missing rows mirrored: `preview_grid`), and the finished grid is decoded in
micro-batches with other requests' grids. Every preview asked for is sent, in order, each showing
its own rows. Final grids go before previews in the decoder's queue; when the decoder lags,
vLLM runs ahead, and the previews that came due meanwhile share one decode of all the rows
known then (or show the final picture's rows, when it is done): a loaded server spends no
decode on a picture already superseded. Admission control bounds the images in flight; a
cancelled request (client gone) aborts its vLLM requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine import metrics
from engine.adapters import Adapter, AdapterRegistry
from engine.captions import CaptionService
from engine.conditions import Condition
from engine.decoding import DecoderService, EncoderService
from engine.sampling import SamplingOptions
from engine.settings import ServiceSettings, device, has_cuda, preview_dtype
from engine.vllm_api import AsyncEngine, sampling_params
from model_registry.model_dir import ModelDir

log = logging.getLogger("llamagen.service")


class QueueFull(Exception):
    """More images than `max_queued_images` would be in flight: retry after `retry_after_s`."""

    def __init__(self, in_flight: int, limit: int, retry_after_s: int):
        super().__init__(f"server busy: {in_flight} images in flight (limit {limit}); "
                         "retry later")
        self.retry_after_s = retry_after_s


@dataclass
class Preview:
    index: int  # which image of the request
    partial_index: int
    pixels: np.ndarray  # full-size canvas: decoded rows on top, grey below


@dataclass
class Finished:
    index: int
    condition: Condition
    seed: int | None  # None: greedy
    tokens: list[int]
    pixels: np.ndarray
    seconds: float


class Reservation:
    """Admitted images; released exactly once, by `release()` or leaving a `with` block."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def preview_rows(grid: int, partial_images: int, known_rows: int = 0) -> list[int]:
    """Rows shown by each preview: evenly spaced fractions k/(p+1) of the rows still to
    generate below the `known_rows` a completion starts from (an edit's previews each show
    some of its new rows, not only the kept ones)."""
    left = grid - known_rows
    return [known_rows + max(1, left * k // (partial_images + 1))
            for k in range(1, partial_images + 1)]


def preview_grid(tokens: Sequence[int], rows: int, grid: int) -> list[int]:
    """A whole grid for a preview of the first `rows` rows: the rows not generated yet are
    the generated ones mirrored (row r+i repeats row r-1-i, cyclically).

    The VQ decoder's GroupNorm and attention see the whole picture, so the rows on top look
    like the final image's only when the picture around them is alike. Decoding the top rows
    alone (a smaller picture) shifted the palette (a yellow star's first preview was
    green); of the fills measured on the demo model (40 images, previews at 2, 4, 6 of 8
    rows, mean absolute difference from the final image's same rows, in levels), mirroring
    came closest: 18.1 / 10.7 / 4.1, against 20.9 / 14.4 / 6.9 for the top rows alone,
    18.5 / 11.3 / 3.9 repeating the last row, 19.7 / 13.6 / 5.9 tiling, 21.9 / 11.2 / 5.3
    the most common code (docs/BENCHMARKS.md)."""
    top = list(tokens[: rows * grid])
    mirrored = [rows - 1 - (i % rows) for i in range(grid - rows)]
    return top + [t for r in mirrored for t in top[r * grid:(r + 1) * grid]]


class ModelService:
    def __init__(self, model: ModelDir, settings: ServiceSettings, models_served: int = 1,
                 name: str | None = None):
        """name: what metrics and clients call it (default: the model directory's name)."""
        self.model, self.settings = model, settings
        self.models_served = models_served
        self.name = name or model.name
        self.engine: AsyncEngine | None = None
        self.decoder: DecoderService | None = None
        self.encoder: EncoderService | None = None
        self.captions: CaptionService | None = None
        # Variations: the null condition in both streams (made once at start).
        self.null_condition: Condition | None = None
        self.adapters: AdapterRegistry | None = None  # with --enable-lora
        self.in_flight = 0  # images admitted and not finished
        self.last_progress = time.monotonic()
        self.throughput = metrics.ThroughputWindow(self.name)

    @property
    def size(self) -> str:
        return f"{self.model.image_size}x{self.model.image_size}"

    async def start(self) -> None:
        if self.model.vq is None:
            raise ValueError(f"{self.model.path} has no VQ decoder: it cannot serve images")
        if self.model.is_t2i and self.model.text_encoder is None:
            raise ValueError(f"{self.model.path} is a t2i model without a text encoder: "
                             "convert it with --text-encoder to serve text prompts")
        # Engines on one GPU split its memory (on CPU each sizes its own KV cache).
        share = self.settings.model_copy(update={
            "gpu_memory_utilization": self.settings.gpu_memory_utilization / self.models_served})
        self.engine = AsyncEngine(self.model, share)
        if self.settings.enable_lora:
            self.adapters = AdapterRegistry(self.model, self.settings.max_loras,
                                            self.settings.max_lora_rank,
                                            self.engine.add_lora, self.engine.remove_lora)
        decoder = self.model.vq_decoder(compile=self.settings.decoder_compile)
        previews = preview_dtype(self.settings.decoder_preview_dtype, decoder.dtype)
        preview_decoder = decoder if previews == decoder.dtype else self.model.vq_decoder(
            dtype=previews, compile=self.settings.decoder_compile)
        threads = self.settings.decoder_threads or max(1, len(os.sched_getaffinity(0)) // 4)
        # On a CPU a decode batch buys little and, padded for invariance, costs a lot.
        batch = self.settings.decoder_max_batch or (32 if has_cuda() else 1)
        self.decoder = DecoderService(
            decoder, preview_decoder=preview_decoder, max_batch_size=batch,
            max_wait_s=self.settings.decoder_max_wait_ms / 1000,
            cpu_threads=None if has_cuda() else threads, on_batch=self._observe_decode,
            invariant=self.settings.decoder_batch_invariant)
        await self.decoder.start()
        # Edits: the VQ encoder, strictly from the model directory's weights, on the
        # decoder's device.
        self.encoder = EncoderService(
            self.model.vq_encoder(device=decoder.device), max_batch_size=batch,
            max_wait_s=self.settings.decoder_max_wait_ms / 1000,
            on_batch=self._observe_image_encode,
            invariant=self.settings.decoder_batch_invariant)
        await self.encoder.start()
        if self.model.is_t2i:
            # The projection runs in the engine's dtype, as the original runs cap_proj.
            projection = self.model.caption_projection(self.engine.dtype, device())
            self.captions = CaptionService(
                self.model.load_text_encoder(device=device()), projection,
                max_batch_size=self.settings.text_encoder_max_batch,
                max_wait_s=self.settings.text_encoder_max_wait_ms / 1000,
                on_batch=self._observe_encode)
            await self.captions.start()
            self.null_condition = Condition.null(self.model, projection)
        else:
            self.null_condition = Condition.null(self.model)

    async def stop(self) -> None:
        if self.captions is not None:
            await self.captions.stop()
        if self.decoder is not None:
            await self.decoder.stop()
        if self.encoder is not None:
            await self.encoder.stop()
        if self.engine is not None:
            self.engine.shutdown()

    def _observe_decode(self, batch: int, seconds: float) -> None:
        metrics.DECODER_BATCH.labels(self.name).observe(batch)
        metrics.DECODER_SECONDS.labels(self.name).observe(seconds)

    def _observe_image_encode(self, batch: int, seconds: float) -> None:
        metrics.ENCODER_BATCH.labels(self.name).observe(batch)
        metrics.ENCODER_SECONDS.labels(self.name).observe(seconds)

    def _observe_encode(self, batch: int, seconds: float) -> None:
        metrics.TEXT_ENCODER_BATCH.labels(self.name).observe(batch)
        metrics.TEXT_ENCODER_SECONDS.labels(self.name).observe(seconds)

    async def encode_prompts(self, texts: list[str]) -> list[Condition]:
        """t2i: captions -> conditions (cleaned, tokenised, encoded, projected)."""
        assert self.captions is not None
        return await self.captions.encode(texts)

    async def encode_image(self, pixels: np.ndarray) -> list[int]:
        """Edits: a model-sized uint8 (H, W, 3) image -> its token grid (raster order)."""
        assert self.encoder is not None
        return await self.encoder.encode(pixels)

    async def check_health(self) -> str | None:
        """None when healthy, else why not."""
        if self.engine is None:
            return "engine not started"
        problem = await self.engine.health()
        if problem is not None:
            return problem
        for worker in (self.decoder, self.encoder, self.captions):
            if worker is not None and not worker.alive:
                return f"{type(worker).__name__} worker is not running"
        stalled = time.monotonic() - self.last_progress
        if self.in_flight and stalled > self.settings.health_stall_s:
            return f"engine wedged: {self.in_flight} images in flight, no progress for " \
                   f"{stalled:.0f} s"
        return None

    @property
    def engine_dead(self) -> bool:
        return self.engine is not None and self.engine.errored

    def retry_after_s(self) -> int:
        rate = self.throughput.rate()
        return max(1, int(self.in_flight / rate) if rate > 0 else 5)

    @property
    def priority_reserve(self) -> int:
        reserve = self.settings.priority_reserve
        if reserve is None:
            priority = self.settings.scheduling_policy == "priority"
            reserve = self.settings.max_queued_images // 4 if priority else 0
        return min(reserve, self.settings.max_queued_images - 1)

    def admit(self, n: int, priority: int = 0) -> Reservation:
        """Reserve room for n images or raise QueueFull (release the reservation when done).
        Work of priority > 0 (less urgent than the default) leaves `priority_reserve` images
        of the queue free, so a full queue refuses it first."""
        limit = self.settings.max_queued_images
        if priority > 0:
            limit -= self.priority_reserve
        if self.in_flight + n > limit:
            metrics.ADMISSION_REJECTIONS.labels(self.name).inc()
            raise QueueFull(self.in_flight, limit, self.retry_after_s())
        self._count(n)
        return Reservation(lambda: self._count(-n))

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        metrics.QUEUE_DEPTH.labels(self.name).set(self.in_flight)

    async def generate(self, conditions: list[Condition], options: SamplingOptions, *,
                       prefixes: Sequence[Sequence[int]] | None = None,
                       partial_images: int = 0,
                       request_id: str | None = None, deadline: float | None = None,
                       priority: int = 0, adapter: Adapter | None = None
                       ) -> AsyncIterator[Preview | Finished]:
        """One image per condition, run concurrently; yields previews and finished images as
        they come. `prefixes`: per condition, the grid's first image codes to complete (edits;
        checked by the caller with `check_prefix`). Closing the iterator (or cancelling
        its consumer) aborts what is unfinished, and so does passing `deadline`
        (time.monotonic()), with TimeoutError. EngineDead when the engine core is gone.
        `priority`: vLLM's (lower runs first) under the priority scheduling policy;
        `adapter`: a loaded LoRA adapter every image is drawn with (both guidance streams)."""
        request_id = request_id or uuid.uuid4().hex
        seeds = options.image_seeds(len(conditions))
        prefixes = prefixes or [()] * len(conditions)
        events: asyncio.Queue[Preview | Finished | BaseException] = asyncio.Queue()
        tasks = [asyncio.create_task(self._image(i, condition, list(prefix), seed, options,
                                                 partial_images, f"{request_id}-{i}", events,
                                                 priority, adapter))
                 for i, (condition, prefix, seed)
                 in enumerate(zip(conditions, prefixes, seeds, strict=True))]
        try:
            for _ in range(len(conditions) * (partial_images + 1)):
                remaining = None if deadline is None else deadline - time.monotonic()
                # The wait, never a yield, sits inside the timeout: the consumer's own work
                # between events counts against the deadline without being cancelled by it.
                event = await asyncio.wait_for(events.get(), remaining)
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _image(self, index: int, condition: Condition, prefix: list[int],
                     seed: int | None, options: SamplingOptions, partial_images: int,
                     vllm_id: str, events: asyncio.Queue[Preview | Finished | BaseException],
                     priority: int = 0, adapter: Adapter | None = None) -> None:
        assert self.decoder is not None and self.engine is not None
        grid = self.model.grid_size
        start = time.monotonic()
        params = sampling_params(self.model, options, seed, stream=True,
                                 prefix_len=len(prefix))
        null = None if self.null_condition is None else self.null_condition.embeds
        prompt = condition.prompt(self.model, prefix, null)
        # Rows each unsent preview shows.
        pending = preview_rows(grid, partial_images, len(prefix) // grid)
        tokens: list[int] = list(prefix)
        finished = False

        async def send_previews(whole: np.ndarray, known_rows: int) -> None:
            while pending and pending[0] <= known_rows:
                k = partial_images - len(pending)
                if k == 0:
                    metrics.FIRST_PREVIEW.labels(self.name).observe(time.monotonic() - start)
                await events.put(Preview(index, k, self._canvas(whole, pending.pop(0))))

        try:
            lora = None if adapter is None else adapter.request
            async for new_tokens, done in self.engine.generate(prompt, params, vllm_id,
                                                               priority, lora):
                tokens.extend(new_tokens)
                finished = done
                self.last_progress = time.monotonic()
                known = len(tokens) // grid
                if pending and pending[0] <= known and not done:
                    # One decode, of every row known now, serves each preview due: when
                    # the decoder lags, vLLM runs ahead and several come due at once.
                    whole = await self.decoder.decode(preview_grid(tokens, known, grid), grid,
                                                      preview=True)
                    await send_previews(whole, known)
            if len(tokens) != grid * grid:
                raise RuntimeError(f"engine returned {len(tokens)} tokens for a "
                                   f"{grid}x{grid} grid")
            pixels = await self.decoder.decode(tokens, grid)
            # Previews that came due with the last tokens show the final picture's rows.
            await send_previews(pixels, grid)
            seconds = time.monotonic() - start
            metrics.IMAGES_GENERATED.labels(self.name).inc()
            if adapter is not None:
                metrics.ADAPTER_IMAGES.labels(self.name, adapter.name).inc()
            metrics.IMAGE_LATENCY.labels(self.name).observe(seconds)
            self.throughput.add()
            await events.put(Finished(index, condition, seed, tokens, pixels, seconds))
        except asyncio.CancelledError:
            if not finished:
                metrics.ABORTED.labels(self.name).inc()
                log.info("aborted %s after %d tokens", vllm_id, len(tokens) - len(prefix))
            raise
        except Exception as e:
            if not finished:
                metrics.ABORTED.labels(self.name).inc()
                with contextlib.suppress(Exception):
                    await self.engine.abort(vllm_id)
            await events.put(e)

    def _canvas(self, whole: np.ndarray, rows: int) -> np.ndarray:
        """A preview: the generated rows of the decoded picture, grey below."""
        shown = rows * (self.model.image_size // self.model.grid_size)
        canvas = np.full_like(whole, 128)
        canvas[:shown] = whole[:shown]
        return canvas
