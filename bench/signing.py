"""`llamagen bench signing`: what C2PA signing adds to each image, by format and size.

The same pixels are encoded with their provenance (what every image gets) and then signed
(`engine.credentials`, ES256 with development credentials), alternating plain and signed
runs so machine noise hits both. Reports the median time per image of each and the bytes the
manifest adds. Signing runs on the encoding worker thread in the server, never on the event
loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import command_line, machine, write_section
from engine.credentials import ContentCredentials, make_development_credentials
from vq_decoder.encoding import IMAGE_FORMATS, encode_image, provenance


def sample_pixels(size: int) -> np.ndarray:
    """Smooth colour fields with some texture: compresses like a generated image, unlike
    noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1)
    pixels = 127.5 * (rgb + 1) + rng.normal(0, 6, (size, size, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def run_signing_benchmark(sizes: list[int], repeats: int, json_out: Path,
                          markdown_out: Path) -> list[dict]:
    record = provenance(model="bench", checkpoint_sha256="0" * 64, seed=0,
                        sampling={"cfg_scale": 4.0}, software="llamagen-serve bench", label=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamagen-c2pa-") as tmp:
        credentials = ContentCredentials.from_files(*make_development_credentials(Path(tmp)))
        for size in sizes:
            pixels = sample_pixels(size)
            for fmt in IMAGE_FORMATS:
                plain_s, signed_s = [], []
                plain = signed = b""
                for _ in range(repeats + 1):  # the first of each is a warm-up
                    start = time.perf_counter()
                    plain = encode_image(pixels, fmt, metadata=record)  # type: ignore[arg-type]
                    plain_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    signed = credentials.sign(
                        encode_image(pixels, fmt, metadata=record),  # type: ignore[arg-type]
                        fmt, record)
                    signed_s.append(time.perf_counter() - start)
                plain_ms = 1000 * statistics.median(plain_s[1:])
                signed_ms = 1000 * statistics.median(signed_s[1:])
                row = {"format": fmt, "image_size": size, "repeats": repeats,
                       "encode_ms": round(plain_ms, 2), "encode_and_sign_ms": round(signed_ms, 2),
                       "signing_ms": round(signed_ms - plain_ms, 2),
                       "ratio": round(signed_ms / plain_ms, 2),
                       "bytes": len(plain), "signed_bytes": len(signed)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    info = machine()
    result = {"benchmark": "signing", "command": command_line(), "machine": info, "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    lines = [
        "## C2PA signing cost per image",
        "",
        f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, {info['cores']} cores). "
        "Encoding with the unsigned provenance (PNG level 6, JPEG/WebP quality 90) against "
        "the same encoding then signed (ES256, c2pa-python, no thumbnail), alternating, "
        f"median of {repeats}. Raw data: `{json_out}`.",
        "",
        "| format | px | encode ms | encode + sign ms | signing ms | ratio | bytes "
        "| signed bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['format']} | {r['image_size']} | {r['encode_ms']} | "
              f"{r['encode_and_sign_ms']} | {r['signing_ms']} | {r['ratio']}x | {r['bytes']} | "
              f"{r['signed_bytes']} |" for r in rows]
    write_section(markdown_out, "signing", "\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json-out", default="docs/bench_signing.json")
    parser.add_argument("--markdown-out", default="docs/BENCHMARKS.md")


def main(args: argparse.Namespace) -> None:
    run_signing_benchmark(args.sizes, args.repeats, Path(args.json_out),
                          Path(args.markdown_out))
