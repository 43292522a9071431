"""The driver of `llamagen sample`: the job's shards through a Ray Data pipeline of engine
actors, with a manifest of finished shards that makes a run resumable.

    ray.data.from_items(unfinished shards)          one row per shard, its items inside
      .map_batches(ShardWorker, batch_size=1,       one actor per engine (a GPU each; on a
                   compute=ActorPoolStrategy(k))    CPU machine a share of its cores)
      .iter_rows()                                  each finished shard -> manifest.json

The driver alone writes the manifest, after the shard's objects are written whole. A run
killed at any point leaves finished shards listed and the rest unlisted (an unlisted shard
whose objects were written is redone, and writes the same bytes under the same names), so a
rerun with the same flags does exactly the unfinished shards.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from jobs.job import SampleJob, shards
from jobs.outputs import MANIFEST, RUN, Output, get_json, put_json, shard_name


class RunMismatch(ValueError):
    """--out holds another run."""


class Execution(BaseModel):
    """Where and how wide the run goes (not part of the job: a resumed run may differ)."""

    actors: int = Field(1, ge=1)
    address: str | None = None  # None: a local Ray instance, started and stopped here
    # None: this machine's cores / actors (local)
    cpus_per_actor: float | None = Field(None, gt=0)
    # None: tensor_parallel_size where Ray sees GPUs
    gpus_per_actor: float | None = Field(None, ge=0)
    endpoint_url: str | None = None
    merge: bool = False
    verbose: bool = False


def start(output: Output, job: SampleJob) -> dict[str, Any]:
    """The manifest to continue from: a new one, or the one a previous run of this job left
    (RunMismatch when --out holds another job's)."""
    output.check()
    existing = get_json(output, RUN)
    if existing is None:
        put_json(output, RUN, job.model_dump())
        manifest: dict[str, Any] = {"shards": {}, "order": []}
        put_json(output, MANIFEST, manifest)
        return manifest
    previous = SampleJob.model_validate(existing)
    if previous.identity() != job.identity():
        differ = sorted(k for k, v in job.identity().items() if previous.identity()[k] != v)
        raise RunMismatch(f"--out {output.url} holds another run (it differs in "
                          f"{', '.join(differ)}); give a new --out, or the same flags to "
                          "resume it")
    return get_json(output, MANIFEST) or {"shards": {}, "order": []}


def run(job: SampleJob, items: list[dict[str, Any]], output: Output, execution: Execution
        ) -> dict[str, Any]:
    manifest = start(output, job)
    planned = shards(items, job.shard_size)
    todo = [i for i in range(len(planned)) if str(i) not in manifest["shards"]]
    total = sum(len(shard) for shard in planned)
    done_before = sum(_progress(r) for r in manifest["shards"].values())
    progress = Progress(total, done_before, len(todo) < len(planned))
    started = time.monotonic()
    if todo:
        import ray

        _init_ray(execution)
        try:
            for row in _pipeline(ray, job, planned, todo, output, execution).iter_rows():
                record = json.loads(row["record"])
                manifest["shards"][str(row["shard"])] = record
                manifest["order"].append(int(row["shard"]))
                put_json(output, MANIFEST, manifest)
                progress.shard_done(_progress(record))
        finally:
            ray.shutdown()
    files = finish(job, output, manifest, len(planned), execution.merge)
    seconds = time.monotonic() - started
    ran = sum(manifest["shards"][str(i)]["samples"] for i in todo)
    summary = {"out": output.url, "kind": job.kind, "shards": len(planned),
               "shards_run": len(todo), "shards_resumed": len(planned) - len(todo),
               "samples": sum(r["samples"] for r in manifest["shards"].values()),
               "samples_run": ran, "seconds": round(seconds, 2),
               "samples_per_s": round(ran / seconds, 3) if seconds > 0 else None,
               "actors": execution.actors, **files}
    if job.kind == "batch":
        summary["lines"] = job.items
        summary["failed_lines"] = sum(r["failed_lines"] for r in manifest["shards"].values())
    put_json(output, "summary.json", summary)
    return summary


def _progress(record: dict[str, Any]) -> int:
    # A Batch run's progress counts lines: its images are known only once lines are checked.
    return record.get("lines", record["samples"])


def _init_ray(execution: Execution) -> None:
    import ray

    # The driver's own output is the progress lines and the summary; Ray's progress bars
    # and the actors' engine logs (in Ray's session logs) would bury them.
    logging.getLogger("ray").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    if not execution.verbose:  # Ray Data sets its own level (INFO) when it is imported
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    env = {"VLLM_LOGGING_LEVEL": "WARNING"} if not execution.verbose else {}
    kwargs: dict[str, Any] = dict(log_to_driver=execution.verbose, configure_logging=False,
                                  runtime_env={"env_vars": env})
    # Inside a Ray job (KubeRay's RayJob, `ray job submit`) RAY_ADDRESS names the cluster.
    address = execution.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        kwargs.update(num_cpus=os.cpu_count(), include_dashboard=False)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)


def _pipeline(ray: Any, job: SampleJob, planned: list[list[dict[str, Any]]],
              todo: list[int], output: Output, execution: Execution) -> Any:
    from jobs.worker import ShardWorker

    resources = ray.cluster_resources()
    gpus = execution.gpus_per_actor
    if gpus is None:
        gpus = job.engine.get("tensor_parallel_size", 1) if resources.get("GPU", 0) else 0
    cpus = execution.cpus_per_actor
    if cpus is None:
        cpus = (max(1, int(resources.get("CPU", 1)) // execution.actors) if not gpus else 1)
    rows = [{"shard": i, "items": json.dumps(planned[i])} for i in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    shared = not gpus and execution.actors > 1
    return dataset.map_batches(
        ShardWorker, batch_size=1, num_cpus=cpus, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=execution.actors),
        fn_constructor_args=(job.model_dump_json(), output.url, execution.endpoint_url,
                             max(1, int(cpus)), shared))


class Progress:
    """One line on stderr per finished shard: samples, samples/s and the ETA."""

    def __init__(self, total: int, done: int, resumed: bool):
        self.total, self.done, self.first = total, done, done
        self.started = time.monotonic()
        if resumed:
            print(f"sample: resuming, {done}/{total} done", file=sys.stderr, flush=True)

    def shard_done(self, samples: int) -> None:
        self.done += samples
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"sample: {self.done}/{self.total} ({100 * self.done / self.total:.1f}%), "
              f"{rate:.2f}/s, ETA {_duration(eta)}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: no rate yet
        return "?"
    minutes, s = divmod(int(seconds + 0.5), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s"


# ---- the end of a run: the Batch output file, the merged .npz ----

def finish(job: SampleJob, output: Output, manifest: dict[str, Any], planned: int,
           merge: bool) -> dict[str, str]:
    if len(manifest["shards"]) != planned:
        raise RuntimeError(f"{len(manifest['shards'])} of {planned} shards finished")
    if job.kind == "batch":
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as tmp:
            for shard in manifest["order"]:
                data = output.get(shard_name(shard, "batch"))
                if data is None:
                    raise RuntimeError(f"{shard_name(shard, 'batch')} is missing from "
                                       f"{output.url}")
                tmp.write(data)
        return {"output_file": output.put_file("output.jsonl", Path(tmp.name))}
    if merge and "npz" in job.outputs:
        return {"merged": merge_npz(output, planned, job)}
    return {}


def merge_npz(output: Output, planned: int, job: SampleJob) -> str:
    """Every shard, in index order, as one .npz (what the ADM evaluator reads), written as
    it is read: memory holds one shard at a time, not all N images."""
    first = _shard(output, 0)
    image = first["arr_0"].shape[1:]
    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as tmp:
        path = Path(tmp.name)
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False, "shape": (job.items, *image)})
            sides: dict[str, list[np.ndarray]] = {}
            for shard in range(planned):
                arrays = first if shard == 0 else _shard(output, shard)
                member.write(np.ascontiguousarray(arrays["arr_0"]).tobytes())
                for key in arrays.files:
                    if key != "arr_0":
                        sides.setdefault(key, []).append(arrays[key])
        for key, parts in sides.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.concatenate(parts), allow_pickle=False)
    return output.put_file("samples.npz", path)


def _shard(output: Output, shard: int) -> Any:
    import io

    data = output.get(shard_name(shard, "npz"))
    if data is None:
        raise RuntimeError(f"{shard_name(shard, 'npz')} is missing from {output.url}")
    return np.load(io.BytesIO(data), allow_pickle=False)
