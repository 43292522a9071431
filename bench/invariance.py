"""`llamagen bench invariance`: what batch-invariant decoding costs.

The server's decoder service decodes every grid of a concurrent stream of requests; free
batching groups whatever arrived (up to 32 grids), invariant batching pads every batch to a
fixed size (1 on a CPU by default) so that an image's pixels never depend on its
batch-mates. Both decode the same grids, `--concurrency` at a time, alternating rounds in
one run so machine noise hits both; the table reports images/s and the ratio to free
batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from bench.report import command_line, machine, write_section
from engine.decoding import DecoderService
from model_registry.model_dir import load_model_dir

MODES = {"free, up to 32": (32, False), "invariant, fixed 1": (1, True),
         "invariant, fixed 8": (8, True)}


async def decode_all(service: DecoderService, grids: torch.Tensor, concurrency: int) -> float:
    """images/s decoding every grid with `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    columns = grids.shape[-1]

    async def one(grid: torch.Tensor) -> None:
        async with gate:
            await service.decode(grid.flatten(), columns)

    start = time.perf_counter()
    await asyncio.gather(*(one(g) for g in grids))
    return len(grids) / (time.perf_counter() - start)


def run_invariance_benchmark(model_dir: Path, levels: list[int], images: int, rounds: int,
                             json_out: Path, markdown_out: Path) -> dict[str, dict[str, float]]:
    model = load_model_dir(model_dir)
    decoder = model.vq_decoder()
    g = torch.Generator().manual_seed(0)
    grids = torch.randint(0, model.gpt.vocab_size, (images, model.grid_size, model.grid_size),
                          generator=g)
    measured: dict[str, list[float]] = {f"{mode} @ {c}": [] for c in levels for mode in MODES}

    async def run() -> None:
        for _ in range(rounds + 1):  # the first round warms up
            for concurrency in levels:
                for mode, (batch, invariant) in MODES.items():
                    service = DecoderService(decoder, max_batch_size=batch, max_wait_s=0.005,
                                             invariant=invariant)
                    await service.start()
                    try:
                        measured[f"{mode} @ {concurrency}"].append(
                            await decode_all(service, grids, concurrency))
                    finally:
                        await service.stop()

    asyncio.run(run())
    result = {key: round(statistics.median(values[1:]), 2) for key, values in measured.items()}
    info = machine()
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"benchmark": "invariance", "command": command_line(),
                                    "machine": info, "model": model.name,
                                    "images_per_s": result, "rounds": measured}, indent=1))
    lines = ["## Batch-invariant decoding: cost", "",
             f"Command: `{command_line()}` ({info['date']}; {info['cpu']}, {info['cores']} "
             f"cores, GPU {info['gpu']}). {model.name} ({model.image_size} px), {images} grids "
             "decoded through the decoder service with 1 or more requests in flight, median of "
             f"{rounds} alternating rounds. Raw data: `{json_out}`.", "",
             "| requests in flight | decode batching | images/s | vs free batching |",
             "|---|---|---|---|"]
    for c in levels:
        free = result[f"{next(iter(MODES))} @ {c}"]
        lines += [f"| {c} | {mode} | {result[f'{mode} @ {c}']} | "
                  f"{result[f'{mode} @ {c}'] / free:.2f}x |" for mode in MODES]
    write_section(markdown_out, "invariance", "\n".join(lines))
    print(json.dumps(result))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: the embedded demo)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", default="docs/bench_invariance.json")
    parser.add_argument("--markdown-out", default="docs/BENCHMARKS.md")


def main(args: argparse.Namespace) -> None:
    from model_registry.demo import DEMO_MODEL

    run_invariance_benchmark(Path(args.model) if args.model else DEMO_MODEL, args.concurrency,
                             args.images, args.rounds, Path(args.json_out),
                             Path(args.markdown_out))
