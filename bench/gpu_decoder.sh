#!/usr/bin/env bash
# The decoder benchmark on a CUDA machine (an H200 in our runs). Needs only PyTorch, not vLLM:
# run from the repository root. bf16 + channels_last, with and without torch.compile, at 256
# and 384 px; results go to $OUT (or docs/) as JSON and a markdown table.
set -euo pipefail
out=${OUT:-docs}
mkdir -p "$out"
PYTHONUNBUFFERED=1 python3 -m bench.decoder --vq-model VQ-16 \
    --batch-sizes 1 8 32 128 256 --image-sizes 256 384 --compile both --min-seconds 2 \
    --json-out "$out/bench_decoder_cuda.json" --markdown-out "$out/BENCHMARKS_cuda.md"
