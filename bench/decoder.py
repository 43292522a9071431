"""`llamagen bench decoder`: VQ decode images/s against batch size.

Random weights at the real tokenizer size (VQ-16 by default: 42 M decoder parameters); decode
cost does not depend on the weights' values. On CUDA it runs in bf16, with and without
`torch.compile`; on CPU in fp32 (what the server uses there); channels_last on both. Every
measurement synchronises the device, repeats until `--min-seconds` have passed, and includes
the uint8 conversion and the copy back to the host, as the server needs them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.report import command_line, machine, write_section
from model_registry.configs import resolve_vq_config
from model_registry.synthetic import random_vq_state_dict
from vq_decoder.decoder import VQDecoder, default_device, default_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(decoder: VQDecoder, batch: int, grid: int, min_seconds: float) -> float:
    """images/s for batches of `batch` (grid x grid codes)."""
    codes = torch.randint(0, decoder.config.codebook_size, (batch, grid, grid))
    decoder.decode_uint8(codes)  # warm-up (and compilation for this shape)
    _sync(decoder.device)
    runs, start = 0, time.perf_counter()
    while True:
        decoder.decode_uint8(codes)
        _sync(decoder.device)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return runs * batch / elapsed


def run_decoder_benchmark(vq_model: str, batch_sizes: list[int], image_sizes: list[int],
                          compile_modes: list[bool], min_seconds: float, json_out: Path,
                          markdown_out: Path) -> list[dict]:
    cfg = resolve_vq_config(vq_model)
    state_dict = random_vq_state_dict(cfg, seed=0)
    device = default_device()
    dtype = default_dtype(device)
    if device.type == "cuda":
        # Real serving numerics: TF32 allowed for fp32 pieces, cuDNN picks the fastest kernels.
        torch.backends.cudnn.benchmark = True
    info = machine()
    rows = []
    for compiled in compile_modes:
        decoder = VQDecoder(cfg, state_dict, device=device, dtype=dtype, compile=compiled)
        for size in image_sizes:
            grid = size // cfg.downsample
            for batch in batch_sizes:
                try:
                    ips = measure(decoder, batch, grid, min_seconds)
                except torch.OutOfMemoryError:
                    ips = None
                row = {"vq": vq_model, "device": device.type, "dtype": str(dtype).split(".")[-1],
                       "compile": compiled, "image_size": size, "batch": batch,
                       "images_per_s": None if ips is None else round(ips, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        del decoder
    result = {"benchmark": "decoder", "command": command_line(), "machine": info, "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    section = f"decoder-{device.type}"
    lines = [
        f"## VQ decoder throughput ({device.type})",
        "",
        f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, {info['cores']} cores, "
        f"GPU {info['gpu']}; torch {info['torch']}). {vq_model} with random weights; images/s "
        "include the uint8 conversion and the copy to the host. Raw data: "
        f"`{json_out}`.",
        "",
        "| device | dtype | torch.compile | image px | batch | images/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['device']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | "
              f"{r['image_size']} | {r['batch']} | "
              f"{r['images_per_s'] if r['images_per_s'] is not None else 'out of memory'} |"
              for r in rows]
    write_section(markdown_out, section, "\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq-model", default="VQ-16")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the decoder (CUDA)")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--json-out", default="docs/bench_decoder.json")
    parser.add_argument("--markdown-out", default="docs/BENCHMARKS.md")


def main(args: argparse.Namespace) -> None:
    compile_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    run_decoder_benchmark(args.vq_model, args.batch_sizes, args.image_sizes, compile_modes,
                          args.min_seconds, Path(args.json_out), Path(args.markdown_out))


if __name__ == "__main__":
    # Needs only PyTorch, so it runs on a GPU machine without vLLM: bench/gpu_decoder.sh.
    parser = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__)
    add_arguments(parser)
    main(parser.parse_args())
