"""What LoRA costs: `llamagen bench lora`.

One run, engines one after another: the base engine with LoRA off, then one with LoRA on
serving the same batch with 0, 1 and 2 adapters in it (0: every image the base; 1: every image
one adapter; 2: half the images each adapter), then the LoRA-off engine again (its two runs
bracket the LoRA engine's, so drift shows). Ratios are to the mean of the LoRA-off runs.
Models: `demo` (the embedded model, its shipped dusk adapter and a random second one) or a
zoo size with random weights and random adapters of rank `rank`.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

from bench.offline import OPTIONS, random_model
from bench.report import command_line, machine, write_section
from engine.adapters import Adapter, offline_adapter
from engine.conditions import Condition
from engine.offline import OfflineGenerator
from engine.settings import EngineSettings
from engine.vllm_api import build_llm
from model_registry.demo import DEMO_MODEL
from model_registry.demo.train_lora import DEMO_ADAPTER
from model_registry.model_dir import ModelDir, load_model_dir
from model_registry.synthetic import save_lora_adapter


def _model(name: str, workdir: Path) -> ModelDir:
    return load_model_dir(DEMO_MODEL) if name == "demo" else random_model(name, workdir)


def _images_per_s(engine: OfflineGenerator, conditions: list[Condition],
                  adapters: list[Adapter | None], rounds: int) -> float:
    engine.generate(conditions[:2], OPTIONS["c2i"], adapters=adapters[:2])  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        engine.generate(conditions, OPTIONS["c2i"], adapters=adapters)
        best = min(best, time.perf_counter() - start)
    return len(conditions) / best


def run_lora_benchmark(model_name: str, batch: int, dtype: str, rank: int, rounds: int,
                       json_out: Path, markdown_out: Path) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamagen-bench-lora-") as tmp:
        model = _model(model_name, Path(tmp))
        if model_name == "demo":
            paths = [DEMO_ADAPTER, save_lora_adapter(model, Path(tmp) / "b", rank=rank, seed=2)]
        else:
            paths = [save_lora_adapter(model, Path(tmp) / name, rank=rank, seed=seed)
                     for name, seed in (("a", 1), ("b", 2))]
        conditions = [Condition(label=i % model.gpt.num_classes) for i in range(batch)]
        max_rank = max(16, rank)
        base = EngineSettings(dtype=dtype, max_num_seqs=batch)

        def lora_off(run: str) -> None:
            engine = OfflineGenerator(model, build_llm(model, base))
            rows.append({"engine": "LoRA off", "run": run, "adapters_in_batch": 0,
                         "images_per_s": round(_images_per_s(engine, conditions,
                                                             [None] * batch, rounds), 3)})
            print(json.dumps(rows[-1]), flush=True)
            del engine
            gc.collect()

        lora_off("before")
        lora = base.model_copy(update={"enable_lora": True, "max_lora_rank": max_rank})
        engine = OfflineGenerator(model, build_llm(model, lora))
        a, b = (offline_adapter(model, path, max_rank) for path in paths)
        for count, which in ((0, [None] * batch), (1, [a] * batch),
                             (2, [a if i % 2 else b for i in range(batch)])):
            rows.append({"engine": "LoRA on", "run": "", "adapters_in_batch": count,
                         "images_per_s": round(_images_per_s(engine, conditions, which,
                                                             rounds), 3)})
            print(json.dumps(rows[-1]), flush=True)
        del engine
        gc.collect()
        lora_off("after")
    reference = sum(r["images_per_s"] for r in rows if r["engine"] == "LoRA off") / 2
    for row in rows:
        row["vs_lora_off"] = round(row["images_per_s"] / reference, 3)
    info = machine()
    result = {"benchmark": "lora", "command": command_line(), "machine": info,
              "model": model_name, "batch": batch, "dtype": dtype, "adapter_rank": rank,
              "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    lines = [f"## LoRA adapters: images/s with 0, 1 and 2 adapters in one batch ({model_name})",
             "", f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, "
             f"{info['cores']} cores; torch {info['torch']}, vLLM {info['vllm']}). Batch "
             f"{batch}, {dtype}, cfg {OPTIONS['c2i'].cfg_scale}, best of {rounds}; engines one "
             "after another in this run, the LoRA-off engine before and after.", "",
             "| engine | adapters in the batch | images/s | vs LoRA off |", "|---|---|---|---|"]
    lines += [f"| {r['engine']}{' (' + r['run'] + ')' if r['run'] else ''} | "
              f"{r['adapters_in_batch']} | {r['images_per_s']} | {r['vs_lora_off']}x |"
              for r in rows]
    write_section(markdown_out, f"lora-{model_name}", "\n".join(lines) + "\n")
    return result
