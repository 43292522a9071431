"""`llamagen bench sample`: what Ray costs. `llamagen sample` (one actor, a local Ray
instance) against `llamagen generate` on the same machine, in one run, alternating, for the
same samples (balanced labels, seeds 0..N-1) written as PNG files with provenance by both,
and as .npz shards by `sample`. Each command is timed end to end (start-up included: what
a user waits for). `sample`'s manifest records each shard's time inside its actor, which
splits its run into the part that grows with N (the shards) and the fixed part (Python and
Ray start-up, the actor's engine start, the driver's bookkeeping): the two terms of the
scaling model for k engines.

Both run as the user runs them (subprocesses of the CLI), so this module imports neither.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import command_line, machine, write_section


def _run(args: list[str]) -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                            text=True)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"llamagen {args[0]} failed:\n{result.stderr[-2000:]}")
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


def run_sample_benchmark(samples: int, classes: int, shard_size: int, rounds: int,
                         json_out: Path, markdown_out: Path) -> dict[str, Any]:
    labels = [str(i % classes) for i in range(samples)]
    times: dict[str, list[float]] = {"generate": [], "sample_images": [], "sample_npz": []}
    in_shards: dict[str, list[float]] = {"sample_images": [], "sample_npz": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-sample-") as work:
            times["generate"].append(_run(["generate", "--labels", *labels, "--seed", "0",
                                           "--out-dir", f"{work}/generate"])[0])
            common = ["sample", "--num-samples", str(samples), "--labels", "balanced",
                      "--seed", "0", "--shard-size", str(shard_size)]
            for name, outputs in (("sample_images", "images"), ("sample_npz", "npz")):
                times[name].append(_run([*common, "--outputs", outputs, "--out",
                                         f"{work}/{outputs}"])[0])
                manifest = json.loads(Path(f"{work}/{outputs}/manifest.json").read_text())
                in_shards[name].append(sum(r["seconds"] for r in manifest["shards"].values()))
    best = {k: min(v) for k, v in times.items()}
    # Of the best round: its time in shards, and the rest (fixed, whatever N).
    split = {k: {"in_shards": round(in_shards[k][v.index(best[k])], 2),
                 "fixed": round(best[k] - in_shards[k][v.index(best[k])], 2),
                 "shard_samples_per_s": round(samples / in_shards[k][v.index(best[k])], 2)}
             for k, v in times.items() if k in in_shards}
    report = {"machine": machine(), "command": command_line(), "samples": samples,
              "shard_size": shard_size, "rounds": rounds, "seconds": times,
              "in_shards_seconds": in_shards, "split": split,
              "samples_per_s": {k: round(samples / v, 2) for k, v in best.items()},
              "sample_over_generate": {k: round(best["generate"] / v, 3)
                                       for k, v in best.items() if k != "generate"}}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    rows = "\n".join(
        f"| {k} | {best[k]:.1f} | {report['samples_per_s'][k]:.2f} | "
        f"{report['sample_over_generate'].get(k, 1.0):.2f}x | "
        + (f"{split[k]['in_shards']:.1f} | {split[k]['fixed']:.1f} | "
           f"{split[k]['shard_samples_per_s']:.2f} |" if k in split else "| | |")
        for k in times)
    title = "## What Ray costs: `sample` (1 actor) against `generate`"
    write_section(markdown_out, "sample", f"""{title}

`{report['command']}` ({m['date']}; {m['cpu']}, {m['cores']} cores, GPU {m['gpu']};
torch {m['torch']}, vLLM {m['vllm']}). The demo model, {samples} samples (balanced labels,
seeds 0..{samples - 1}), shards of {shard_size}; each command end to end (start-up included),
best of {rounds} alternating rounds. Both write PNG files with provenance; `sample_npz`
writes the .npz shards instead. `in shards`: the actor's time on its shards (from the
manifest); `fixed`: the rest of the run (start-up of Python, Ray and the engine, the
driver). Raw times: `{json_out}`.

| command | seconds | samples/s | vs generate | in shards (s) | fixed (s) | samples/s in shards |
|---|---|---|---|---|---|---|
{rows}
""")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10, help="the demo model's classes")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", default="docs/bench_sample.json")
    parser.add_argument("--markdown-out", default="docs/BENCHMARKS.md")


def main(args: argparse.Namespace) -> None:
    report = run_sample_benchmark(args.samples, args.classes, args.shard_size, args.rounds,
                                  Path(args.json_out), Path(args.markdown_out))
    print(json.dumps(report["sample_over_generate"]))
