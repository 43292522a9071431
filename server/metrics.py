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
