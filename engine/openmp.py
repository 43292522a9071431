"""OpenMP's idle policy for the server's engine processes on CPUs.

libgomp (PyTorch's OpenMP) lets a thread that finished its share of a parallel region spin
for GOMP_SPINCOUNT iterations (300,000 by default) before it sleeps. The server runs three
processes on the same cores (the API process with the VQ decoder, vLLM's engine core, its
worker), and the worker's spinning threads take the cores the others need between model
steps. On 2 cores, HTTP images/s of the demo model at 8 clients (`llamagen bench serve`,
two runs each): default 15.5 / 12.7, 100,000 13.9 / 14.4, 10,000 21.0 / 21.0, 1,000
23.8 / 21.4, 0 19.3 / 18.0, OMP_WAIT_POLICY=PASSIVE 20.7 / 19.7 (docs/BENCHMARKS.md).

libgomp reads the variable when torch loads it, and vLLM forks its processes on CPUs, so
`llamagen serve` sets it before anything imports torch (`cli/__init__.py`), and
`engine.vllm_api.prepare_environment` sets it again for engines whose processes start
fresh (spawned). An in-process engine (`llamagen generate`, the benchmarks' offline runs)
keeps libgomp's default: with the cores to itself, spinning shortens its waits (demo model,
batch 8, three runs each: 36.8 / 36.6 / 34.9 images/s by default, 33.8 / 34.3 / 32.8 with
1,000). A value the user set wins.
"""

from __future__ import annotations

import os

GOMP_SPINCOUNT = "1000"


def set_openmp_defaults() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
