"""`llamagen bench soak`: resident memory of a running server and its engine processes under
steady load, to show it does not grow.

A closed loop of `--concurrency` clients (the `bench serve` client) runs for `--duration`
seconds against `--url`, while the resident set size (RSS) of the server process and of each
process below it (vLLM's engine core and workers) is sampled every `--interval` seconds. The
verdict compares the last sample with the one at minute 1 (after warm-up allocations): the
server's memory is steady when the total stays within `--tolerance` (10 %) of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil

from bench.report import command_line, machine, write_section
from bench.serve import LoadSpec, run_load


def server_pid(url: str) -> int:
    """The process listening on the URL's port."""
    port = urlparse(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise ValueError(f"no process listens on port {port}; give --pid")


def rss_mib(pid: int) -> dict[str, float]:
    """RSS in MiB of the process and each process below it, by name."""
    root = psutil.Process(pid)
    sizes: dict[str, float] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = f"{proc.name()}[{proc.pid}]"
            sizes[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            continue
    return sizes


async def soak(spec: LoadSpec, pid: int, duration_s: float, interval_s: float,
               concurrency: int) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    started = time.monotonic()

    async def sampler() -> None:
        while True:
            sizes = rss_mib(pid)
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": sizes,
                            "total_mib": round(sum(sizes.values()), 1)})
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(sampler())
    try:
        load = await run_load(spec, mode="closed", concurrency=concurrency,
                              requests=10**9, duration_s=duration_s, progress=False)
    finally:
        task.cancel()
    samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": rss_mib(pid),
                    "total_mib": 0.0})
    samples[-1]["total_mib"] = round(sum(samples[-1]["rss_mib"].values()), 1)
    return {"load": {k: v for k, v in load.items() if k not in ("latencies", "first_partials")},
            "samples": samples}


def verdict(samples: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    minute = next((s for s in samples if s["t_s"] >= 60), samples[0])
    end = samples[-1]
    per_process = {name: {"minute_1_mib": minute["rss_mib"][name], "end_mib": mib,
                          "change": round(mib / minute["rss_mib"][name] - 1, 4)}
                   for name, mib in end["rss_mib"].items() if name in minute["rss_mib"]}
    change = end["total_mib"] / minute["total_mib"] - 1
    return {"minute_1_total_mib": minute["total_mib"], "end_total_mib": end["total_mib"],
            "change": round(change, 4), "within_tolerance": abs(change) <= tolerance,
            "tolerance": tolerance, "per_process": per_process}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL (loopback)")
    parser.add_argument("--api-key")
    parser.add_argument("--pid", type=int, help="server process (default: the one listening "
                        "on the URL's port)")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--interval", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompts", nargs="+", default=["0", "1", "2", "3"])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json-out", default="docs/bench_soak.json")
    parser.add_argument("--markdown-out", default="docs/BENCHMARKS.md")


def main(args: argparse.Namespace) -> dict[str, Any]:
    spec = LoadSpec(url=args.url.rstrip("/"), api_key=args.api_key, prompts=args.prompts,
                    n=args.n)
    pid = args.pid or server_pid(spec.url)
    run = asyncio.run(soak(spec, pid, args.duration, args.interval, args.concurrency))
    result = {"benchmark": "soak", "command": command_line(), "machine": machine(),
              **run, "verdict": verdict(run["samples"], args.tolerance)}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    v, load, info = result["verdict"], run["load"], result["machine"]
    lines = ["## Soak: resident memory under 10 minutes of load", "",
             f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, "
             f"{info['cores']} cores), against `llamagen serve` on the demo model. "
             f"{load['requests']} requests, {load['images']} images, "
             f"{load['images_per_s']} images/s, errors {load['errors_by_status'] or 0}. "
             f"Raw data: `{args.json_out}`.", "",
             "| process | RSS at minute 1 (MiB) | RSS at the end (MiB) | change |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {p['minute_1_mib']} | {p['end_mib']} | {p['change']:+.1%} |"
              for name, p in v["per_process"].items()]
    lines += [f"| **total** | {v['minute_1_total_mib']} | {v['end_total_mib']} | "
              f"{v['change']:+.1%} ({'within' if v['within_tolerance'] else 'OUTSIDE'} "
              f"{v['tolerance']:.0%}) |"]
    write_section(Path(args.markdown_out), "soak", "\n".join(lines))
    print(json.dumps(result["verdict"], indent=1))
    return result
