"""`llamagen bench serve`: load-test a running server with an async httpx client.

Closed loop (a fixed number of concurrent clients, each sending its next request when the last
one finished) or open loop (Poisson arrivals at a fixed rate). Every run is bounded by a request
count and a duration and targets only the given URL. Reports images/s, requests/s, latency and
time-to-first-partial-image percentiles, errors by status, and the server's own /metrics deltas
(requests counted, KV cache usage and queue depth seen while it ran), as JSON and PNG plots.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

WARMUP_INDEX = 1_000_000
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


@dataclass
class Outcome:
    status: int  # HTTP status; 0 for a transport error
    seconds: float
    images: int = 0
    first_partial_s: float | None = None


@dataclass
class LoadSpec:
    url: str
    api_key: str | None = None
    model: str | None = None
    prompts: list[str] = field(default_factory=lambda: ["0"])
    n: int = 1
    stream: bool = False
    partial_images: int = 0
    seed: int = 0
    response_format: str = "b64_json"
    size: str | None = None  # None: not sent (the native size)
    edit_rows: int | None = None  # an edit keeping this many rows of `image`
    image: bytes | None = None

    @property
    def label(self) -> str:
        """What this spec sends, as the report's `request` column says."""
        what = "generation" if self.edit_rows is None else f"edit keep_rows={self.edit_rows}"
        if self.stream:
            what += f", stream {self.partial_images} previews"
        if self.size:
            what += f", size {self.size}"
        return f"{what}, {self.response_format}"

    @property
    def path(self) -> str:
        return "/v1/images/generations" if self.edit_rows is None else "/v1/images/edits"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def request(self, i: int) -> dict[str, Any]:
        """httpx keyword arguments of request i: JSON, or a multipart form for an edit."""
        body = self.body(i)
        if self.edit_rows is None:
            return {"json": body}
        assert self.image is not None
        body["keep_rows"] = self.edit_rows
        fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items()}
        return {"data": fields, "files": {"image": ("input.png", self.image, "image/png")}}

    def body(self, i: int) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompts[i % len(self.prompts)], "n": self.n,
                                "seed": self.seed + 1000 * i}
        if self.model:
            body["model"] = self.model
        if self.stream:
            body.update(stream=True, partial_images=self.partial_images)
        if self.response_format != "omitted":  # omitted: the server's default
            body["response_format"] = self.response_format
        if self.size:
            body["size"] = self.size
        return body


def parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            key = m.group(1) + (m.group(2) or "")
            samples[key] = samples.get(key, 0.0) + float(m.group(3))
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    try:
        return parse_metrics((await client.get(f"{url}/metrics", timeout=10)).text)
    except httpx.HTTPError:
        return {}


async def send(client: httpx.AsyncClient, spec: LoadSpec, i: int) -> Outcome:
    start = time.perf_counter()
    url = f"{spec.url}{spec.path}"
    try:
        if not spec.stream:
            r = await client.post(url, headers=spec.headers(), **spec.request(i))
            images = len(r.json().get("data", [])) if r.status_code == 200 else 0
            return Outcome(r.status_code, time.perf_counter() - start, images)
        first, images, status = None, 0, 0
        async with client.stream("POST", url, headers=spec.headers(), **spec.request(i)) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return Outcome(status, time.perf_counter() - start)
            async for line in r.aiter_lines():
                if line.endswith(".partial_image") and first is None:
                    first = time.perf_counter() - start
                elif line.startswith("event: image_") and line.endswith(".completed"):
                    images += 1
                elif line.startswith("event: error"):
                    status = 500
        return Outcome(status, time.perf_counter() - start, images, first)
    except httpx.HTTPError:
        return Outcome(0, time.perf_counter() - start)


async def run_load(spec: LoadSpec, *, mode: str = "closed", concurrency: int = 1,
                   rate: float = 1.0, requests: int = 20, duration_s: float = 60.0,
                   warmup: int = 0, progress: bool = True) -> dict[str, Any]:
    """One bounded run: at most `requests` requests and `duration_s` seconds."""
    limits = httpx.Limits(max_connections=max(concurrency, 64))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        for i in range(warmup):  # indices past the run's: valid, different seeds
            await send(client, spec, WARMUP_INDEX + i)
        before = await scrape(client, spec.url)
        outcomes: list[Outcome] = []
        peaks = {"kv_cache_usage": 0.0, "queue_depth": 0.0, "waiting": 0.0}
        bar = tqdm(total=requests, desc=f"{mode} loop", unit="req", disable=not progress)
        deadline = time.perf_counter() + duration_s
        started = time.perf_counter()
        issued = 0

        def next_index() -> int | None:
            nonlocal issued
            if issued >= requests or time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

        async def record(i: int) -> None:
            outcomes.append(await send(client, spec, i))
            bar.update()

        async def sampler() -> None:
            while True:
                m = await scrape(client, spec.url)
                peaks["kv_cache_usage"] = max(peaks["kv_cache_usage"],
                                              metric_sum(m, "vllm:kv_cache_usage_perc"))
                peaks["queue_depth"] = max(peaks["queue_depth"],
                                           metric_sum(m, "llamagen_queue_depth"))
                peaks["waiting"] = max(peaks["waiting"],
                                       metric_sum(m, "vllm:num_requests_waiting"))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(sampler())
        try:
            if mode == "closed":
                async def worker() -> None:
                    while (i := next_index()) is not None:
                        await record(i)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            else:
                rng = random.Random(spec.seed)
                tasks = []
                while (i := next_index()) is not None:
                    tasks.append(asyncio.create_task(record(i)))
                    await asyncio.sleep(rng.expovariate(rate))
                await asyncio.gather(*tasks)
        finally:
            watcher.cancel()
            bar.close()
        wall = time.perf_counter() - started
        after = await scrape(client, spec.url)
    return summarize(outcomes, wall, before, after, peaks) | {
        "mode": mode, "concurrency": concurrency if mode == "closed" else None,
        "rate": rate if mode == "open" else None, "n": spec.n, "stream": spec.stream,
        "response_format": spec.response_format, "request": spec.label}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(outcomes: list[Outcome], wall: float, before: dict[str, float],
              after: dict[str, float], peaks: dict[str, float]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.seconds for o in ok]
    firsts = [o.first_partial_s for o in ok if o.first_partial_s is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200:
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1

    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    return {
        "requests": len(outcomes), "ok": len(ok), "errors_by_status": errors,
        "seconds": round(wall, 3),
        "images": sum(o.images for o in ok),
        "images_per_s": round(sum(o.images for o in ok) / wall, 3) if wall else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "latency_s": {"p50": _pct(latencies, 50), "p90": _pct(latencies, 90),
                      "p99": _pct(latencies, 99)},
        "first_partial_s": {"p50": _pct(firsts, 50), "p90": _pct(firsts, 90),
                            "p99": _pct(firsts, 99)},
        "server": {
            "requests_counted": delta("llamagen_requests_total"),
            "images_generated": delta("llamagen_images_generated_total"),
            "admission_rejections": delta("llamagen_admission_rejections_total"),
            "generation_tokens": delta("vllm:generation_tokens_total"),
            "peak_kv_cache_usage": round(peaks["kv_cache_usage"], 4),
            "peak_queue_depth": peaks["queue_depth"],
            "peak_waiting": peaks["waiting"],
        },
        "latencies": [round(x, 4) for x in sorted(latencies)],
        "first_partials": [round(x, 4) for x in sorted(firsts)],
    }


def merge_runs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Slices of one kind's run (`--rounds`) -> one run: totals summed, rates over the summed
    time, percentiles over every latency."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    seconds = sum(p["seconds"] for p in parts)
    images = sum(p["images"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    latencies = sorted(x for p in parts for x in p["latencies"])
    firsts = sorted(x for p in parts for x in p["first_partials"])
    errors: dict[str, int] = {}
    for p in parts:
        for status, count in p["errors_by_status"].items():
            errors[status] = errors.get(status, 0) + count
    server = {k: (max if k.startswith("peak") else sum)(p["server"][k] for p in parts)
              for k in first["server"]}
    return {**first, "requests": sum(p["requests"] for p in parts), "ok": ok,
            "errors_by_status": errors, "seconds": round(seconds, 3), "images": images,
            "images_per_s": round(images / seconds, 3) if seconds else None,
            "requests_per_s": round(ok / seconds, 3) if seconds else None,
            "latency_s": {"p50": _pct(latencies, 50), "p90": _pct(latencies, 90),
                          "p99": _pct(latencies, 99)},
            "first_partial_s": {"p50": _pct(firsts, 50), "p90": _pct(firsts, 90),
                                "p99": _pct(firsts, 99)},
            "server": server, "latencies": latencies, "first_partials": firsts,
            "rounds": len(parts)}


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Latency CDF of every run; with several closed-loop runs, throughput and p99 against
    concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        lat = run["latencies"]
        if lat:
            label = f"c={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate']}/s"
            if run["response_format"] != "b64_json":
                label += f" {run['response_format']}"
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=label)
    ax.set(xlabel="latency (s)", ylabel="fraction of requests", title="Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    sweep = [r for r in runs if r["mode"] == "closed"
             and r["response_format"] == runs[0]["response_format"]]
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["concurrency"] for r in sweep]
        ax.plot(xs, [r["images_per_s"] for r in sweep], "o-", label="images/s")
        ax.set(xlabel="concurrency", ylabel="images/s", xscale="log", title="Throughput, p99")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["latency_s"]["p99"] for r in sweep], "s--", color="tab:red",
                 label="p99 latency")
        ax2.set_ylabel("p99 latency (s)")
        ax.grid(alpha=0.3)
        fig.legend(loc="upper left")
        fig.tight_layout()
        paths.append(out_dir / "sweep.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def sweep_levels(limit: int) -> list[int]:
    levels, c = [], 1
    while c <= limit:
        levels.append(c)
        c *= 2
    return levels


def offline_ceiling(model_dir: Path, concurrency: int, images: int, dtype: str) -> dict:
    """The same images through the offline engine (batch = concurrency) and the reference loop,
    both with the VQ decode the server also does, in this process."""
    import torch

    from bench.offline import OPTIONS as TASK_OPTIONS
    from engine.conditions import Condition
    from engine.offline import OfflineGenerator
    from engine.settings import TORCH_DTYPES, EngineSettings, resolve_dtype
    from engine.vllm_api import build_llm
    from model_registry.generate import generate
    from model_registry.model_dir import load_model_dir

    OPTIONS = TASK_OPTIONS["c2i"]

    model = load_model_dir(model_dir)
    if model.is_t2i:
        raise ValueError("--offline-model compares class-conditional models; for t2i engine "
                         "vs reference use `llamagen bench offline --task t2i`")
    dtype = resolve_dtype(dtype)  # type: ignore[arg-type]
    labels = [i % model.gpt.num_classes for i in range(images)]
    decoder = model.vq_decoder()
    grid = model.grid_size

    def decode(tokens: Any) -> None:
        decoder.decode_uint8(torch.as_tensor(tokens).view(-1, grid, grid))

    engine = OfflineGenerator(model, build_llm(model, EngineSettings(
        dtype=dtype, max_num_seqs=concurrency)))  # type: ignore[arg-type]
    conditions = [Condition(label=label) for label in labels]
    engine.generate(conditions[:1], OPTIONS)
    start = time.perf_counter()
    tokens, _ = engine.generate(conditions, OPTIONS)
    decode(tokens)
    engine_s = time.perf_counter() - start
    reference = model.load_reference(dtype=TORCH_DTYPES[dtype])
    start = time.perf_counter()
    for i in range(0, images, concurrency):
        decode(generate(reference, torch.tensor(labels[i: i + concurrency]),
                        cfg_scale=OPTIONS.cfg_scale, top_k=OPTIONS.top_k))
    reference_s = time.perf_counter() - start
    return {"images": images, "dtype": dtype,
            "engine_images_per_s": round(images / engine_s, 3),
            "reference_images_per_s": round(images / reference_s, 3)}


def input_image(spec: LoadSpec) -> bytes:
    """An image for the edit runs: one the server generates for the first prompt."""
    body = {**spec.body(0), "n": 1, "stream": False}
    body.pop("partial_images", None)
    r = httpx.post(f"{spec.url}/v1/images/generations", json=body, headers=spec.headers(),
                   timeout=600)
    r.raise_for_status()
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def _first_model(spec: LoadSpec) -> str:
    try:
        models = httpx.get(f"{spec.url}/v1/models", headers=spec.headers(), timeout=10).json()
        return models["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return "unknown"


def add_arguments(parser: Any) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. "
                        "http://127.0.0.1:8000 (the only address the tool sends to)")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop clients")
    parser.add_argument("--rate", type=float, default=2.0, help="open loop requests/s")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (a cap)")
    parser.add_argument("--duration", type=float, default=300, help="seconds per run (a cap)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="split each run into this many "
                        "slices, alternating the request kinds (noisy machines)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--response-format", nargs="+", default=["b64_json"],
                        choices=["b64_json", "url", "omitted"], help="one run per format at "
                        "each level (url: what the image store adds; omitted: the server's "
                        "--default-response-format)")
    parser.add_argument("--sizes", nargs="+", default=[], metavar="WxH", help="also run "
                        "the first request kind at these sizes (resampled from the native)")
    parser.add_argument("--prompts", nargs="+", default=["0", "1", "2", "3"],
                        help="class ids or names, used in turn")
    parser.add_argument("--stream", action="store_true", help="stream every request")
    parser.add_argument("--partial-images", type=int, default=0)
    parser.add_argument("--compare-stream", type=int, metavar="PREVIEWS",
                        help="also run each level streamed with this many previews, side by "
                        "side with the non-streamed run")
    parser.add_argument("--edit-rows", type=int, nargs="+", default=[], metavar="K",
                        help="also run edits (POST /v1/images/edits) keeping K token rows of "
                        "an image the server generated first, side by side with generations")
    parser.add_argument("--sweep", type=int, metavar="MAX",
                        help="closed loop at concurrency 1, 2, 4, ... up to MAX")
    parser.add_argument("--offline-model", help="also measure the offline engine and the "
                        "reference loop on this model directory (same as the server's)")
    parser.add_argument("--offline-dtype", default="auto")
    parser.add_argument("--json-out", default="docs/bench_serve.json")
    parser.add_argument("--plots-dir", default="docs/bench_serve")
    parser.add_argument("--markdown-out", help="write a section into this markdown file")
    parser.add_argument("--markdown-section", help="its name (default: serve-MODEL)")


def main(args: Any) -> dict:
    from bench.report import command_line, machine, write_section

    specs = [LoadSpec(url=args.url.rstrip("/"), api_key=args.api_key, model=args.model,
                      prompts=args.prompts, n=args.n, stream=args.stream,
                      partial_images=args.partial_images, response_format=fmt)
             for fmt in args.response_format]
    spec = specs[0]
    if args.compare_stream is not None:
        specs.append(replace(spec, stream=True, partial_images=args.compare_stream))
    specs += [replace(spec, size=size) for size in args.sizes]
    if args.edit_rows:
        image = input_image(spec)
        specs += [replace(spec, edit_rows=k, image=image) for k in args.edit_rows]
    levels = sweep_levels(args.sweep) if args.sweep else [args.concurrency]
    runs = []
    rounds = max(1, args.rounds)
    for level in (levels if args.mode == "closed" else [args.concurrency]):
        # The kinds side by side at each level, in `rounds` alternating slices, so that the
        # machine's noise hits them alike.
        parts: list[list[dict[str, Any]]] = [[] for _ in specs]
        for r in range(rounds):
            for k, each in enumerate(specs):
                parts[k].append(asyncio.run(run_load(
                    each, mode=args.mode, concurrency=level, rate=args.rate,
                    requests=-(-args.requests // rounds), duration_s=args.duration / rounds,
                    warmup=args.warmup if r == 0 else 0)))
        for part in parts:
            runs.append(merge_runs(part))
            print(json.dumps({k: v for k, v in runs[-1].items()
                              if k not in ("latencies", "first_partials")}), flush=True)
    if args.offline_model:
        ceilings: dict[int, dict[str, Any]] = {}  # one offline measurement per level
        for run in runs:
            level = run["concurrency"] or max(1, round(args.rate))
            if level not in ceilings:
                ceilings[level] = offline_ceiling(Path(args.offline_model), level,
                                                  max(run["images"], level), args.offline_dtype)
                print(json.dumps(ceilings[level]), flush=True)
            run["offline"] = dict(ceilings[level])
            if run["images_per_s"]:
                run["offline"]["http_vs_engine"] = round(
                    run["images_per_s"] / run["offline"]["engine_images_per_s"], 3)
    served = args.model or _first_model(spec)
    result = {"benchmark": "serve", "command": command_line(), "machine": machine(),
              "url": spec.url, "model": served, "runs": runs}
    plots = plot(runs, Path(args.plots_dir))
    result["plots"] = [str(p) for p in plots]
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    if args.markdown_out:
        info = result["machine"]
        title = f"HTTP server under load vs offline engine vs reference loop: {served}"
        if args.markdown_section:
            title += f" ({args.markdown_section})"
        lines = [f"## {title}", "",
                 f"Command: `{result['command']}` ({info['date']}; {info['cpu']}, "
                 f"{info['cores']} cores). Server and client on the same machine; offline "
                 "numbers include the VQ decode, as the server does. Raw data: "
                 f"`{args.json_out}`; plots: " + ", ".join(f"`{p}`" for p in plots) + ".", "",
                 "| mode | concurrency | request | images/s HTTP | p50 s | p99 s | offline engine "
                 "images/s | reference images/s | HTTP / engine | errors |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            off = r.get("offline", {})
            lines.append(f"| {r['mode']} | {r['concurrency'] or r['rate']} | "
                         f"{r['request']} | {r['images_per_s']} | "
                         f"{r['latency_s']['p50']} | "
                         f"{r['latency_s']['p99']} | {off.get('engine_images_per_s', '-')} | "
                         f"{off.get('reference_images_per_s', '-')} | "
                         f"{off.get('http_vs_engine', '-')} | {r['errors_by_status'] or 0} |")
        write_section(Path(args.markdown_out), args.markdown_section or f"serve-{served}",
                      "\n".join(lines))
    return result
