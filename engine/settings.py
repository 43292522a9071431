"""How an engine and its model service are configured, and what this machine can run.

`EngineSettings` sizes the vLLM engine; `ServiceSettings` adds what one served model needs
around it (decoder and caption micro-batching, admission, health). The server's settings
extend these with HTTP fields; the CLI and the benchmarks use them directly.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
# vLLM's --kv-cache-dtype values (auto: the model's dtype).
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineSettings(BaseModel):
    """How the vLLM engine is configured; shared by the CLI, the server and the benchmarks."""

    dtype: DType = Field("auto", description="auto: bfloat16 where the hardware runs it "
                         "natively, else float32 (parity is defined in float32)")
    max_num_seqs: int = Field(
        default_factory=lambda: 128 if has_cuda() else 32, ge=1, le=1024,
        description="images generated concurrently (vLLM batch; default 128 on GPUs, where "
        "the linear layers need about 80 (A100) to 100 (H200) images in flight to be "
        "compute-bound, docs/DEPLOY.md; 32 on CPUs)")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="CPU KV cache size in GiB (default: sized for max_num_seqs)")
    kv_cache_dtype: KVCacheDType = Field(
        "auto", description="vLLM's KV cache dtype: auto (the model's) or fp8 (one byte per "
        "value: more images per GiB, approximate attention; see docs/BENCHMARKS.md)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1,
                                          description="fraction of GPU memory vLLM may use")
    cpu_threads: int | None = Field(None, ge=1,
                                    description="CPU threads for the model (default: all cores)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (tensor parallel)")
    enforce_eager: bool | None = Field(
        None, description="run the model eagerly: no torch.compile, no CUDA graphs (default: "
        "compiled with CUDA graphs on GPUs, eager on CPUs, where compiling costs about 35 s "
        "of start-up for about a fifth more images/s; --no-enforce-eager compiles with "
        "vLLM's CPU backend)")
    seed: int = Field(0, description="engine seed (requests carry their own seeds)")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="vLLM's scheduling policy: fcfs (first come, first served) or "
        "priority (requests carry a `priority`, lower runs first, ties by arrival)")
    enable_lora: bool = Field(False, description="serve LoRA adapters (vLLM's multi-LoRA "
                              "batching; on when --lora-modules are given)")
    max_loras: int = Field(2, ge=1, le=64, description="adapters loaded at once, all of "
                           "them servable in one batch (vLLM's --max-loras: a slot of LoRA "
                           "weights each)")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="the largest adapter rank served (vLLM's --max-lora-rank, one of its "
        "sizes)")
    quantization: Literal["fp8"] | None = Field(
        None, description="vLLM's weight quantization at load: fp8 (GPUs only; vLLM's CPU "
        "build has no fp8 weight kernels)")

    @model_validator(mode="after")
    def _quantization_needs_a_gpu(self) -> EngineSettings:
        if self.quantization is not None and not has_cuda():
            raise ValueError(f"quantization {self.quantization} needs an NVIDIA GPU (vLLM's "
                             "CPU build has no fp8 weight kernels)")
        return self


class ServiceSettings(EngineSettings):
    """One served model: the engine plus decoding, caption encoding, admission and health."""

    max_queued_images: int = Field(
        default_factory=lambda: 256 if has_cuda() else 64, ge=1, description="images admitted "
        "at once (queued + running) per model; beyond it requests get 429 (default: twice "
        "max_num_seqs' default, 256 on GPUs, 64 on CPUs)")
    priority_reserve: int | None = Field(
        None, ge=0, description="images of the admission queue that only requests of "
        "priority <= 0 may take: a full queue refuses less urgent work first (default: a "
        "quarter of --max-queued-images under --scheduling-policy priority, else 0)")
    health_stall_s: float = Field(120.0, gt=0, description="/health fails when images are in "
                                  "flight but the engine produced nothing for this long")
    decoder_max_batch: int | None = Field(None, ge=1, description="VQ decode micro-batch "
                                          "size (default: 32 on GPU, 1 on CPU)")
    decoder_batch_invariant: bool = Field(True, description="pad every decode batch to "
                                          "--decoder-max-batch grids, so that an image's "
                                          "pixels never depend on what else is in flight")
    decoder_max_wait_ms: float = Field(5.0, ge=0, description="longest wait to fill a batch")
    decoder_threads: int | None = Field(None, ge=1, description="CPU threads for VQ decoding "
                                        "(default: a quarter of the cores, at least 1)")
    decoder_compile: bool = Field(False, description="torch.compile the decoder (CUDA)")
    decoder_preview_dtype: DType = Field(
        "auto", description="dtype of streamed previews' decodes (final images keep the "
        "decoder's); auto: bfloat16 on GPUs and on CPUs that run it natively, else float32")
    text_encoder_max_batch: int = Field(32, ge=1, description="t2i: captions per T5 batch "
                                        "(prompts of concurrent requests encode together)")
    text_encoder_max_wait_ms: float = Field(2.0, ge=0, description="t2i: longest wait to "
                                            "fill a caption batch")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if has_cuda() else "cpu"


@cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: DType) -> str:
    if dtype != "auto":
        return dtype
    if has_cuda():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def preview_dtype(dtype: DType, final: torch.dtype) -> torch.dtype:
    """The dtype previews decode in, given the final images' decoder dtype. On a CPU with
    native bf16 a bf16 decode takes half the time (measured: 1.9x on the demo decoder, 2.2x on
    VQ-16), at a mean 0.25 / 1.4 levels from fp32: invisible in a picture shown for a moment."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if has_cuda():
        return final
    return torch.bfloat16 if cpu_has_native_bf16() else final


def cpu_threads(settings: EngineSettings) -> int:
    return settings.cpu_threads or len(os.sched_getaffinity(0))
