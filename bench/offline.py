"""`llamagen bench offline`: the vLLM engine against the reference loop, in one run.

Both generate the same images (random-weight models in the official format, converted like a
real checkpoint) with the same dtype, batch sizes and sampling settings, one after the other in
this process, so machine noise hits both; the table reports images/s and their ratio. Token
generation only: no VQ decode, no text encoding.

c2i: cfg 4.0, top-k 2000, temperature 1 (the original demo's). t2i (`--task t2i`): cfg 7.5,
top-k 1000 (sample_t2i.py's), random caption features of mixed lengths (CAPTION_LENGTHS T5
tokens), left-padded with masks for the reference, the valid rows only for the engine.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.flops import image_flops, matmul_ceiling
from bench.report import command_line, machine, write_section
from engine.conditions import Condition
from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from engine.settings import TORCH_DTYPES, EngineSettings
from engine.vllm_api import (
    build_llm,
    cpu_kv_cache_bytes,
    kv_bytes_per_image,
    kv_bytes_per_token,
    kv_cache_tokens,
)
from model_registry.configs import GPT_MODELS, GPTConfig, task_config
from model_registry.convert import convert
from model_registry.generate import generate
from model_registry.model_dir import ModelDir
from model_registry.synthetic import save_gpt_checkpoint
from model_registry.text_encoder import left_pad

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, dim=256),
    **GPT_MODELS,
}
# The seed's table (LlamaGen's autoregressive/serve/README.md, "Comparison (A100)"): vLLM
# 0.4.1 on an A100, 8 class-conditional images at 384 px (576 tokens), cfg 4.0, seconds for
# the batch (token generation only). Printed beside our rows so that an operator reads the
# ratio on their own GPU: `--image-size 384 --batch-sizes 8` is the same setting.
SEED_A100_SECONDS = {"GPT-B": 2.39, "GPT-L": 3.48, "GPT-XL": 4.84, "GPT-XXL": 6.36,
                     "GPT-3B": 6.26}
SEED_IMAGES, SEED_IMAGE_SIZE = 8, 384
# --modes -> enforce_eager (None: the machine's default).
MODES: dict[str, bool | None] = {"default": None, "eager": True, "compiled": False}
# Each task's default sampling (the original samplers'), seeded.
OPTIONS = {task: SamplingOptions.resolve(task, seed=0) for task in ("c2i", "t2i")}
# Typical prompts are a sentence: 8-50 T5 tokens; cycled over a batch.
CAPTION_LENGTHS = (12, 20, 32, 48)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference_inputs(config: GPTConfig, n: int, dtype: torch.dtype) -> list:
    """Class labels (c2i) or valid caption feature rows (t2i) for n images."""
    if config.model_type == "c2i":
        return [i % config.num_classes for i in range(n)]
    g = torch.Generator().manual_seed(n)
    return [(0.25 * torch.randn(CAPTION_LENGTHS[i % len(CAPTION_LENGTHS)], config.caption_dim,
                                generator=g)).to(dtype) for i in range(n)]


def random_model(size: str, workdir: Path, task: str = "c2i", image_size: int = 256
                 ) -> ModelDir:
    """A zoo size with random weights, converted into a model directory under `workdir`."""
    config = GPTConfig(**SIZES[size], **task_config(task, image_size))
    ckpt = save_gpt_checkpoint(config, workdir / f"{size}.pt")
    model = convert(ckpt, json.dumps(config.to_dict()), workdir / size, overwrite=True)
    ckpt.unlink()
    return model


def bench_size(size: str, batch_sizes: list[int], dtype: str, workdir: Path,
               task: str = "c2i", kv_cache_dtype: str = "auto", mode: str = "default",
               image_size: int = 256) -> list[dict]:
    """mode: default (the machine's: compiled with CUDA graphs on GPUs, eager on CPUs),
    eager, or compiled (vLLM's torch.compile of the model; on CPUs its inductor backend)."""
    options = OPTIONS[task]
    model = random_model(size, workdir, task, image_size)
    config = model.gpt
    settings = EngineSettings(dtype=dtype, max_num_seqs=max(batch_sizes),
                              kv_cache_dtype=kv_cache_dtype, enforce_eager=MODES[mode])
    started = time.perf_counter()
    llm = build_llm(model, settings)
    start_s = time.perf_counter() - started
    # Images in flight per GiB of KV cache: by our page count, and by what vLLM allocated
    # (its tokens for the bytes given, in images of whole pages).
    per_image = kv_bytes_per_image(model, dtype, kv_cache_dtype)
    image_tokens = per_image // kv_bytes_per_token(model, dtype, kv_cache_dtype)
    given_gib = cpu_kv_cache_bytes(model, settings, dtype) / 2**30
    kv = {"mode": mode, "start_s": round(start_s, 1), "kv_cache_dtype": kv_cache_dtype,
          "images_per_kv_gib": round(2**30 / per_image, 1),
          "vllm_images_per_kv_gib": round(kv_cache_tokens(llm) / image_tokens / given_gib, 1)}
    engine = OfflineGenerator(model, llm)
    torch_dtype = TORCH_DTYPES[dtype]
    reference = model.load_reference(dtype=torch_dtype)
    generator = torch.Generator().manual_seed(0)

    def run_reference(inputs: list) -> None:
        if task == "c2i":
            cond, masks = torch.tensor(inputs), None
        else:
            cond, masks = left_pad(inputs)
        generate(reference, cond, emb_masks=masks, cfg_scale=options.cfg_scale,
                 top_k=options.top_k, temperature=options.temperature, generator=generator)

    def engine_conditions(inputs: list) -> list[Condition]:
        # Caption projection happens before the engine in serving too: not timed.
        return (engine.caption_features(inputs) if task == "t2i"
                else [Condition(label=label) for label in inputs])

    warm = reference_inputs(config, 1, torch_dtype)
    engine.generate(engine_conditions(warm), options)  # warm-up: first-call allocations
    run_reference(warm)
    rows = []
    for bs in batch_sizes:
        inputs = reference_inputs(config, bs, torch_dtype)
        conds = engine_conditions(inputs)
        t_engine = _timed(lambda conds=conds: engine.generate(conds, options))
        t_ref = _timed(lambda inputs=inputs: run_reference(inputs))
        # The machine's limit for these shapes, measured now, beside the engine's run.
        ceiling = {name: matmul_ceiling(config, bs, TORCH_DTYPES[name])
                   for name in dict.fromkeys((dtype, "float32"))}
        condition = (sum(c.input_tokens for c in conds) / len(conds))
        achieved = bs * image_flops(config, round(condition)) / t_engine
        row = {"size": size, "task": task, "dtype": dtype, **kv, "batch": bs,
               "tokens_per_image": config.block_size,
               "engine_s": round(t_engine, 3), "reference_s": round(t_ref, 3),
               "engine_images_per_s": round(bs / t_engine, 3),
               "reference_images_per_s": round(bs / t_ref, 3),
               "speedup": round(t_ref / t_engine, 2),
               "gflop_per_image": round(image_flops(config, round(condition)) / 1e9, 2),
               "engine_gflops": round(achieved / 1e9, 1),
               "matmul_ceiling_gflops": {k: round(v / 1e9, 1) for k, v in ceiling.items()},
               "engine_vs_ceiling": round(achieved / ceiling[dtype], 3),
               **seed_row(size, task, image_size, bs, bs / t_engine)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def seed_row(size: str, task: str, image_size: int, batch: int,
             images_per_s: float) -> dict:
    """The seed's A100 figure for this model, and our ratio to it where the setting is the
    same (c2i, 384 px, batch 8)."""
    if task != "c2i" or size not in SEED_A100_SECONDS:
        return {}
    seed = SEED_IMAGES / SEED_A100_SECONDS[size]
    row = {"seed_a100_vllm041_images_per_s": round(seed, 2)}
    if image_size == SEED_IMAGE_SIZE and batch == SEED_IMAGES:
        row["vs_seed_a100"] = round(images_per_s / seed, 3)
    return row


def run_offline_benchmark(sizes: list[str], batch_sizes: list[int], dtype: str,
                          json_out: Path, markdown_out: Path, task: str = "c2i",
                          kv_cache_dtypes: tuple[str, ...] = ("auto",),
                          modes: tuple[str, ...] = ("default",), image_size: int = 256
                          ) -> list[dict]:
    """kv_cache_dtypes, modes: one engine after another for each size and combination (side
    by side in this run, in that order)."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    info = machine()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llamagen-bench-") as tmp:
        for size in sizes:
            for mode in modes:
                for kv_cache_dtype in kv_cache_dtypes:
                    rows += bench_size(size, batch_sizes, dtype, Path(tmp), task,
                                       kv_cache_dtype, mode, image_size)
                    gc.collect()  # free this engine before the next starts
    options = OPTIONS[task]
    result = {"benchmark": "offline", "task": task, "command": command_line(), "machine": info,
              "sampling": options.model_dump(), "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    condition = ("class-conditional (1 condition token)" if task == "c2i" else
                 "text-conditional (120-slot caption prefix; random caption features of "
                 f"{', '.join(map(str, CAPTION_LENGTHS))} valid tokens, cycled)")
    grid = image_size // 16
    kv_note = ("" if tuple(kv_cache_dtypes) == ("auto",) else
               f", KV cache {' vs '.join(kv_cache_dtypes)}")
    if tuple(modes) != ("default",):
        kv_note += f", {' vs '.join(modes)}"
    lines = [
        f"## Offline generation ({task}): vLLM engine vs reference loop{kv_note}",
        "",
        f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, {info['cores']} cores, "
        f"GPU {info['gpu']}; torch {info['torch']}, vLLM {info['vllm']}).",
        f"{image_size}x{image_size} images ({grid}x{grid} = {grid * grid} tokens each), "
        f"{condition}, random weights, "
        f"cfg {options.cfg_scale}, top-k {options.top_k}, temperature 1; token generation "
        "only. The reference is the original two-row CFG loop with a static KV cache "
        f"(`model_registry/generate.py`). Raw data: `{json_out}`.",
        *([] if task == "c2i" else [
            "", "The engine prefills and caches only each caption's valid rows; the reference, "
            "like the original, runs all 120 slots with padding masked. The released t2i size, "
            "GPT-XL, is too slow for the reference on a small CPU machine; the zoo sizes listed "
            "stand in for it (same architecture, caption_dim 2048)."]),
        "",
        "The last columns put the engine against the machine: the FLOPs of an image "
        "(`bench/flops.py` `image_flops`: both guidance streams, every layer's matmuls and "
        "attention, the output head per generated token) times images/s, against the "
        "throughput PyTorch's GEMM reaches on the same cores for the model's own decode-step "
        "shapes (`matmul_ceiling`: M = 2 x batch rows), measured in the same run, in the "
        "run's dtype (fp32 beside it).",
        "",
        "| model | dtype | engine (start-up s) | KV cache | images per KV GiB | batch "
        "| engine images/s "
        "| reference images/s | engine / reference "
        "| GFLOP/image | engine GFLOP/s | matmul ceiling GFLOP/s (fp32) | engine / ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['dtype']} | {r['mode']} ({r['start_s']}) | "
              f"{r['kv_cache_dtype']} | "
              f"{r['images_per_kv_gib']} ({r['vllm_images_per_kv_gib']}) | "
              f"{r['batch']} | {r['engine_images_per_s']} | "
              f"{r['reference_images_per_s']} | {r['speedup']}x | {r['gflop_per_image']} | "
              f"{r['engine_gflops']} | {r['matmul_ceiling_gflops'][r['dtype']]} "
              f"({r['matmul_ceiling_gflops']['float32']}) | "
              f"{100 * r['engine_vs_ceiling']:.0f}% |" for r in rows]
    seeds = {r["size"]: r["seed_a100_vllm041_images_per_s"] for r in rows
             if "seed_a100_vllm041_images_per_s" in r}
    if seeds:
        lines += ["", "The seed's table for these models (A100, vLLM 0.4.1, 8 images at 384 px, "
                  "cfg 4.0): " + ", ".join(f"{k} {v} images/s" for k, v in seeds.items()) +
                  "." + "".join(f" {r['size']} batch 8 here: {r['vs_seed_a100']}x of it."
                                for r in rows if "vs_seed_a100" in r)]
    section = "offline" if task == "c2i" else f"offline-{task}"
    if tuple(kv_cache_dtypes) != ("auto",):
        section += "-kv"
    if tuple(modes) != ("default",):
        section += "-compiled"
    write_section(markdown_out, section, "\n".join(lines))
    return rows
