"""The engine layer's Prometheus metrics (`llamagen_*`), beside vLLM's own `vllm:*` in the
same registry (the HTTP layer adds its request metrics in `server/metrics.py`).

vLLM's AsyncLLM registers its metrics in prometheus_client's default registry of this process,
so `/metrics` serves both; dashboards and autoscalers written for vLLM keep working.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

IMAGES_GENERATED = Counter("llamagen_images_generated", "Images generated", ["model"])
IMAGE_LATENCY = Histogram("llamagen_image_latency_seconds",
                          "Per-image latency, admission to encoded image", ["model"],
                          buckets=LATENCY_BUCKETS)
FIRST_PREVIEW = Histogram("llamagen_time_to_first_preview_seconds",
                          "Admission to the first streamed preview", ["model"],
                          buckets=LATENCY_BUCKETS)
DECODER_BATCH = Histogram("llamagen_decoder_batch_size", "Grids per VQ decode batch", ["model"],
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128))
DECODER_SECONDS = Histogram("llamagen_decoder_seconds", "VQ decode time per batch", ["model"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
ENCODER_BATCH = Histogram("llamagen_encoder_batch_size",
                          "Images per VQ encode batch (edits)", ["model"],
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ENCODER_SECONDS = Histogram("llamagen_encoder_seconds", "VQ encode time per batch (edits)",
                            ["model"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
TEXT_ENCODER_BATCH = Histogram("llamagen_text_encoder_batch_size",
                               "Captions per text-encoder batch (t2i)", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
TEXT_ENCODER_SECONDS = Histogram("llamagen_text_encoder_seconds",
                                 "Text encoding + caption projection time per batch (t2i)",
                                 ["model"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
QUEUE_DEPTH = Gauge("llamagen_queue_depth", "Images admitted and not finished", ["model"])
ADMISSION_REJECTIONS = Counter("llamagen_admission_rejections",
                               "Requests refused because the image queue was full", ["model"])
ABORTED = Counter("llamagen_requests_aborted",
                  "Image generations aborted in vLLM (client gone or error)", ["model"])
IMAGES_PER_SECOND = Gauge("llamagen_images_per_second",
                          "Images finished per second over the last minute", ["model"])


class ThroughputWindow:
    """Images/s over a sliding window, read at scrape time."""

    def __init__(self, model: str, window_s: float = 60.0):
        self.window_s = window_s
        self._done: deque[float] = deque()
        self._started = time.monotonic()
        IMAGES_PER_SECOND.labels(model).set_function(self.rate)

    def add(self) -> None:
        self._done.append(time.monotonic())

    def rate(self) -> float:
        now = time.monotonic()
        while self._done and self._done[0] < now - self.window_s:
            self._done.popleft()
        span = min(self.window_s, max(now - self._started, 1e-9))
        return len(self._done) / span
ADAPTER_IMAGES = Counter("llamagen_adapter_images", "Images generated with a LoRA adapter",
                         ["model", "adapter"])
