"""`llamagen bench make-model`: a random-weight model directory of a real GPT size, for load
tests without downloads. The GPT is converted from an official-format checkpoint like a real
one; the VQ decoder is a small one (codebook of the GPT's size, 32 base channels), so that on a
CPU the benchmark measures generation, not a full-size VQ-16 decoder (`bench decoder` measures
that)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.offline import SIZES
from model_registry.configs import GPTConfig, task_config
from model_registry.convert import convert
from model_registry.synthetic import save_gpt_checkpoint, save_vq_checkpoint
from vq_decoder.vq_model import VQConfig

SMALL_VQ = VQConfig(codebook_size=16384, encoder_ch_mult=(1, 1, 2, 2, 2),
                    decoder_ch_mult=(1, 1, 2, 2, 2), z_channels=32, ch=32)


def make_random_model(size: str, out: Path, image_size: int = 256, seed: int = 0) -> Path:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    gpt = GPTConfig(**SIZES[size], **task_config("c2i", image_size))
    with tempfile.TemporaryDirectory(prefix="llamagen-model-") as tmp:
        ckpt = save_gpt_checkpoint(gpt, Path(tmp) / "gpt.pt", seed=seed)
        vq = save_vq_checkpoint(SMALL_VQ, Path(tmp) / "vq.pt", seed=seed)
        convert(ckpt, json.dumps(gpt.to_dict()), out, vq_checkpoint=vq,
                vq_model=json.dumps(SMALL_VQ.to_dict()), name=f"random-{size}-{image_size}",
                overwrite=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="GPT-B", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> None:
    print(make_random_model(args.size, Path(args.out), args.image_size))
