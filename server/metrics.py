"""The HTTP layer's Prometheus metrics: requests by endpoint and outcome, and their latency.
The engine's (images, decoder, queue, ...) are in `engine/metrics.py`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from engine.metrics import LATENCY_BUCKETS

REQUESTS = Counter("llamagen_requests", "Generation requests by outcome", ["model", "endpoint",
                                                                          "outcome"])
OPEN_STREAMS = Gauge("llamagen_open_streams", "Streamed responses in progress")
TIMEOUTS = Counter("llamagen_request_timeouts", "Generation requests aborted at their "
                   "deadline (--request-timeout-s)", ["model", "endpoint"])
REQUEST_LATENCY = Histogram("llamagen_request_latency_seconds",
                            "Generation request latency, arrival to last image",
                            ["model", "endpoint"], buckets=LATENCY_BUCKETS)

# Usage per API key, labelled by the key's name (never the key); `anonymous` when no key is
# required.
KEY_REQUESTS = Counter("llamagen_key_requests", "Generation requests per API key by outcome",
                       ["key", "endpoint", "outcome"])
KEY_IMAGES = Counter("llamagen_key_images", "Images delivered per API key", ["key"])
KEY_IMAGE_TOKENS = Counter("llamagen_key_image_tokens", "Image tokens generated per API key",
                           ["key"])
KEY_REJECTIONS = Counter("llamagen_key_rejections", "Requests refused by an API key's limits "
                         "(429)", ["key", "limit"])
ADAPTER_REQUESTS = Counter("llamagen_adapter_requests", "Generation requests with a LoRA "
                           "adapter, by outcome", ["model", "adapter", "endpoint", "outcome"])
