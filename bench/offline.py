"""`llamagen bench offline`: the vLLM engine against the reference loop, in one run.

Both generate the same images (random-weight models in the official format, converted like a
real checkpoint) with the same dtype, batch sizes and sampling settings (cfg 4.0, top-k 2000,
temperature 1: the original demo's), one after the other in this process, so machine noise
hits both; the table reports images/s and their ratio. Token generation only: no VQ decode.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.report import command_line, machine, write_section
from model_registry.configs import GPT_MODELS, GPTConfig, task_config
from model_registry.convert import convert
from model_registry.generate import generate
from model_registry.synthetic import save_gpt_checkpoint
from server.engine import TORCH_DTYPES, EngineSettings, build_llm
from server.generation import OfflineGenerator, SamplingOptions

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, dim=256),
    **GPT_MODELS,
}
OPTIONS = SamplingOptions(cfg_scale=4.0, top_k=2000, temperature=1.0, seed=0)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size: str, batch_sizes: list[int], dtype: str, workdir: Path) -> list[dict]:
    config = GPTConfig(**SIZES[size], **task_config("c2i", 256))
    ckpt = save_gpt_checkpoint(config, workdir / f"{size}.pt")
    model = convert(ckpt, json.dumps(config.to_dict()), workdir / size, overwrite=True)
    ckpt.unlink()
    llm = build_llm(model, EngineSettings(dtype=dtype, max_num_seqs=max(batch_sizes)))
    engine = OfflineGenerator(model, llm)
    reference = model.load_reference(dtype=TORCH_DTYPES[dtype])
    generator = torch.Generator().manual_seed(0)

    def run_reference(labels: list[int]) -> None:
        generate(reference, torch.tensor(labels), cfg_scale=OPTIONS.cfg_scale,
                 top_k=OPTIONS.top_k, temperature=OPTIONS.temperature, generator=generator)

    engine.generate([0], OPTIONS)  # warm-up: first-call allocations
    run_reference([0])
    rows = []
    for bs in batch_sizes:
        labels = [i % config.num_classes for i in range(bs)]
        t_engine = _timed(lambda labels=labels: engine.generate(labels, OPTIONS))
        t_ref = _timed(lambda labels=labels: run_reference(labels))
        row = {"size": size, "dtype": dtype, "batch": bs, "tokens_per_image": config.block_size,
               "engine_s": round(t_engine, 3), "reference_s": round(t_ref, 3),
               "engine_images_per_s": round(bs / t_engine, 3),
               "reference_images_per_s": round(bs / t_ref, 3),
               "speedup": round(t_ref / t_engine, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_offline_benchmark(sizes: list[str], batch_sizes: list[int], dtype: str,
                          json_out: Path, markdown_out: Path) -> list[dict]:
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    info = machine()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llamagen-bench-") as tmp:
        for size in sizes:
            rows += bench_size(size, batch_sizes, dtype, Path(tmp))
            gc.collect()  # free this size's engine before the next starts
    result = {"benchmark": "offline", "command": command_line(), "machine": info,
              "sampling": OPTIONS.model_dump(), "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    lines = [
        "## Offline generation: vLLM engine vs reference loop",
        "",
        f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, {info['cores']} cores, "
        f"GPU {info['gpu']}; torch {info['torch']}, vLLM {info['vllm']}).",
        "256x256 images (16x16 = 256 tokens each), random weights, cfg 4.0, top-k 2000, "
        "temperature 1; token generation only. The reference is the original two-row CFG loop "
        "with a static KV cache (`model_registry/generate.py`). Raw data: "
        f"`{json_out}`.",
        "",
        "| model | dtype | batch | engine images/s | reference images/s | engine / reference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['dtype']} | {r['batch']} | {r['engine_images_per_s']} | "
              f"{r['reference_images_per_s']} | {r['speedup']}x |" for r in rows]
    write_section(markdown_out, "offline", "\n".join(lines))
    return rows
