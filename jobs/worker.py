"""The Ray Data actor: one engine (an in-process `vllm.LLM`, as `llamagen generate` runs)
and the model's VQ decoder; it turns one shard into its output objects and answers a small
record of them. The shard's images go through the engine in one call and through the
decoder in padded batches, so a sample's pixels depend on its condition and seed alone."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.conditions import Condition
from engine.decoding import decode_grids, encode_images
from engine.images import ImageWriter
from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from engine.settings import EngineSettings
from engine.vllm_api import build_llm, share_cpu_cores
from jobs.batch import (
    LineError,
    LineRequest,
    check_request,
    envelope,
    error_line,
    parse_line,
    respond,
)
from jobs.job import SampleJob
from jobs.outputs import open_output, shard_name
from model_registry.model_dir import load_model_dir
from server.errors import ServiceError
from vq_decoder.encoder import VQEncoder
from vq_decoder.encoding import IMAGE_FORMATS

log = logging.getLogger("llamagen.sample")


class ShardWorker:
    """`map_batches`' callable class: rows `{shard, items}` in, rows `{shard, record}` out
    (the record as JSON: the driver writes it into the manifest)."""

    def __init__(self, job: str, out: str, endpoint_url: str | None, cpu_threads: int,
                 shared_cores: bool):
        """`cpu_threads`: the cores Ray gave this actor (CPU engines); `shared_cores`:
        several actors on one machine's cores, where vLLM's binding to the whole NUMA node
        would stack them on the same cores (so the OS places their threads)."""
        self.job = SampleJob.model_validate_json(job)
        if shared_cores:
            share_cpu_cores()
        self.model = load_model_dir(Path(self.job.model))
        settings = EngineSettings(**{**self.job.engine,
                                     "cpu_threads": self.job.engine.get("cpu_threads")
                                     or cpu_threads})
        self.generator = OfflineGenerator(self.model, build_llm(self.model, settings))
        self.decoder = self.model.vq_decoder()
        self._encoder: VQEncoder | None = None  # edits' images, built at the first edit
        self.output = open_output(out, endpoint_url)
        self.options = SamplingOptions.resolve(self.model.gpt.model_type, **self.job.sampling)
        self.writer = ImageWriter(self.model, self.options, self.job.image_format,  # type: ignore[arg-type]
                                  self.job.compression)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        shards, records = [], []
        for shard, items in zip(batch["shard"], batch["items"], strict=True):
            start = time.monotonic()
            run = self.batch_shard if self.job.kind == "batch" else self.sample_shard
            record = run(int(shard), json.loads(str(items)))
            record["seconds"] = round(time.monotonic() - start, 3)
            shards.append(int(shard))
            records.append(json.dumps(record))
        return {"shard": shards, "record": records}

    @property
    def encoder(self) -> VQEncoder:
        if self._encoder is None:
            self._encoder = self.model.vq_encoder()
        return self._encoder

    # ---- classes and captions: samples to .npz shards and/or image files ----

    def sample_shard(self, shard: int, items: list[dict[str, Any]]) -> dict[str, Any]:
        job = self.job
        if job.kind == "captions":
            conditions = self.generator.captions([item["caption"] for item in items])
        else:
            conditions = [Condition(label=item["label"]) for item in items]
        seeds = [None if self.options.greedy else job.sample_seed(item["index"])
                 for item in items]
        grids, seeds = self.generator.generate(conditions, self.options, seeds=seeds)
        pixels = decode_grids(self.decoder, grids, job.decode_batch)
        files = []
        if "npz" in job.outputs:
            files.append(self.output.put(shard_name(shard, job.kind),
                                         npz_bytes(items, pixels, seeds)))
        if "images" in job.outputs:
            extension = IMAGE_FORMATS[self.writer.format].extension
            media_type = IMAGE_FORMATS[self.writer.format].media_type
            for item, condition, image, seed in zip(items, conditions, pixels, seeds,
                                                    strict=True):
                stem = (f"{item['index']:06d}" if condition.label is None
                        else f"{item['index']:06d}_{condition.label}")
                files.append(self.output.put(f"images/{stem}.{extension}",
                                             self.writer.encode(image, condition, seed),
                                             media_type))
        return {"samples": len(items), "first": items[0]["index"],
                "files": files if "images" not in job.outputs else files[:1]}

    # ---- Batch lines: one output line per input line ----

    def batch_shard(self, shard: int, items: list[dict[str, Any]]) -> dict[str, Any]:
        lines: dict[int, dict[str, Any]] = {}
        requests: list[LineRequest] = []
        for item in items:
            number, custom_id = item["line"], None
            try:
                custom_id, url, body = parse_line(item["text"], item.get("duplicate", False))
                requests.append(check_request(self.job, self.model, number, custom_id, url,
                                              body))
            except LineError as e:
                lines[number] = envelope(number, self.job, e.custom_id, error=e)
            except ServiceError as e:
                lines[number] = error_line(number, self.job, custom_id, e)
        if self.model.is_t2i and requests:
            texts = list(dict.fromkeys(t for r in requests for t in r.texts))
            encoded = dict(zip(texts, self.generator.captions(texts), strict=True))
            for r in requests:
                r.condition = encoded[r.texts[0]].with_negative(
                    encoded[r.texts[1]] if len(r.texts) > 1 else None)
        edits = [r for r in requests if r.edit is not None]
        if edits:
            grid = self.model.grid_size
            codes = encode_images(self.encoder, [r.pixels for r in edits],  # type: ignore[misc]
                                  self.job.decode_batch)
            for r, code in zip(edits, codes, strict=True):
                assert r.edit is not None
                r.prefix = code[: r.edit.kept_rows * grid]
        conditions = [r.condition for r in requests for _ in range(r.body.n)]
        options = [r.options for r in requests for _ in range(r.body.n)]
        prefixes = [r.prefix for r in requests for _ in range(r.body.n)]
        seeds = [s for r in requests for s in r.seeds]
        images = 0
        if conditions:
            grids, _ = self.generator.generate(conditions, options, prefixes,  # type: ignore[arg-type]
                                               seeds=seeds)
            pixels = decode_grids(self.decoder, grids, self.job.decode_batch)
            for r in requests:
                mine, pixels = pixels[: r.body.n], pixels[r.body.n:]
                try:
                    lines[r.line] = respond(self.job, self.model, r, mine, self.output)
                    images += r.body.n
                except Exception:  # one line's failure (say, the store) is that line's 500
                    log.exception("batch line %d failed", r.line)
                    lines[r.line] = error_line(r.line, self.job, r.custom_id,
                                               ServiceError(500, f"line {r.line} failed; "
                                                            "its images were not written",
                                                            type="server_error",
                                                            code="internal_error"))
        text = "".join(json.dumps(lines[n]) + "\n" for n in sorted(lines))
        where = self.output.put(shard_name(shard, "batch"), text.encode(),
                                "application/jsonl")
        failed = sum(1 for line in lines.values()
                     if line["error"] is not None or line["response"]["status_code"] != 200)
        return {"samples": images, "lines": len(items), "failed_lines": failed,
                "first": items[0]["line"], "files": [where]}


def npz_bytes(items: list[dict[str, Any]], pixels: list[np.ndarray],
              seeds: list[int | None]) -> bytes:
    """One shard in the ADM evaluator's layout (`arr_0`, uint8 N x H x W x 3) with what
    regenerates each sample beside it (seed -1: greedy, no seed)."""
    extra: dict[str, np.ndarray] = {}
    if "label" in items[0]:
        extra["labels"] = np.array([item["label"] for item in items], dtype=np.int64)
    else:
        extra["captions"] = np.array([item["caption"] for item in items])
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.stack(pixels).astype(np.uint8),
             indices=np.array([item["index"] for item in items], dtype=np.int64),
             seeds=np.array([-1 if s is None else s for s in seeds], dtype=np.int64), **extra)
    return buffer.getvalue()
