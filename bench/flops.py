"""FLOPs of generating an image, and the matmul ceiling of this machine for the same shapes.

`image_flops` is the one count the benchmarks use. It counts what the engine computes for
one image, both guidance streams (the engine always runs both; guidance only mixes their
logits), multiply-adds as 2 FLOPs:

- every token position of both streams through every layer: the `wqkv`, `wo`, `w13` and `w2`
  matmuls (2·D·3D + 2·D·D + 2·D·2F + 2·F·D per token and layer), and attention's two
  products over the positions the token sees (2 · 2·ctx·D per token and layer);
- the output head once per generated token and stream (2·D·V): logits are computed for the
  last position of each step only;
- condition positions (1 class token, or L caption tokens) and a prefix count like image
  tokens, since they run the same layers; RMSNorm, RoPE, SiLU and softmax are left out
  (elementwise, a few FLOPs per value against thousands per matmul row).

`matmul_ceiling` times the model's own decode-step matmuls (M = 2 streams × batch rows) in a
dtype on this machine's threads: the most a step can reach if it did nothing but those
matmuls at the speed PyTorch's CPU GEMM runs them in isolation.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from model_registry.configs import GPTConfig

STREAMS = 2  # conditional and unconditional, side by side in one sequence


def image_flops(config: GPTConfig, condition_tokens: int | None = None) -> float:
    """FLOPs to generate one image's grid (see the module docstring for what counts)."""
    D, F_, V, L = config.dim, config.ffn_hidden, config.vocab_size, config.n_layer
    cond = config.cls_token_num if condition_tokens is None else condition_tokens
    positions = cond + config.block_size - 1  # the last image token is sampled, never fed
    linear = 2 * (D * 3 * D + D * D + D * 2 * F_ + F_ * D)
    # A token at position p attends to p + 1 positions: sum over all fed positions.
    attended = positions * (positions + 1) / 2
    layers = L * (positions * linear + 2 * 2 * D * attended)
    head = config.block_size * 2 * D * V
    return STREAMS * (layers + head)


def step_shapes(config: GPTConfig, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of a decode step's matmuls for `batch` images: per layer wqkv, wo, w13, w2,
    then the output head."""
    D, F_, V = config.dim, config.ffn_hidden, config.vocab_size
    M = STREAMS * batch
    per_layer = [(M, D, 3 * D), (M, D, D), (M, D, 2 * F_), (M, F_, D)]
    return per_layer * config.n_layer + [(M, D, V)]


@torch.inference_mode()
def matmul_ceiling(config: GPTConfig, batch: int, dtype: torch.dtype,
                   seconds: float = 1.0) -> float:
    """FLOP/s of a decode step's matmuls (`step_shapes`), run back to back for about
    `seconds` after a warm-up, in this process's torch threads."""
    g = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g)
                 .to(dtype)) for m, k, n in step_shapes(config, batch)]
    flops_per_step = sum(2 * m * k * n for m, k, n in step_shapes(config, batch))

    def step() -> None:
        for x, w in operands:
            F.linear(x, w)

    step()
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or steps < 3:
        step()
        steps += 1
    return flops_per_step * steps / elapsed
