"""Where a run writes: a directory, or an S3-compatible bucket under a prefix (the server's
image-store client, `server.image_store.Bucket`). Every object is written whole (a local
file by rename, an S3 object by one PUT), so a reader, or a resumed run, never sees half of
one.

The layout under `--out`:

    run.json                     the job (a resumed run must match it)
    manifest.json                finished shards, in the order they finished
    shards/shard-000003.npz      arr_0 (uint8 N x H x W x 3, the ADM evaluator's layout),
                                 indices, seeds, and labels or captions
    images/000123_7.png          with `--outputs images`: one file per sample, with provenance
    batch/shard-000003.jsonl     a Batch run's output lines, per shard
    output.jsonl                 a Batch run's output file (the shards' lines, in order of
                                 completion)
    samples.npz                  with `--merge`: every shard in index order, one file
    summary.json                 the last run's summary
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from server.image_store import Bucket

MANIFEST = "manifest.json"
RUN = "run.json"


class Output(Protocol):
    url: str

    def check(self) -> None:
        """Raise StoreUnavailable (or OSError) if it cannot be written."""

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream"
            ) -> str:
        """Write one object whole; where it is (a path or an s3:// URL)."""

    def put_file(self, name: str, path: Path) -> str: ...

    def get(self, name: str) -> bytes | None: ...


class DirectoryOutput:
    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.url = str(self.directory)

    def check(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"{self.directory}: not writable")

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream"
            ) -> str:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
        return str(path)

    def put_file(self, name: str, path: Path) -> str:
        target = self.directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        return str(target)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None


class BucketOutput:
    def __init__(self, url: str, endpoint_url: str | None = None):
        self.bucket = Bucket(url, endpoint_url)
        self.url = url.rstrip("/")

    def check(self) -> None:
        self.bucket.check()

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream"
            ) -> str:
        self.bucket.put(name, data, content_type)
        return f"{self.url}/{name}"

    def put_file(self, name: str, path: Path) -> str:
        self.bucket.put_file(name, path)
        path.unlink()
        return f"{self.url}/{name}"

    def get(self, name: str) -> bytes | None:
        obj = self.bucket.get(name)
        return None if obj is None else obj["Body"].read()


def open_output(out: str, endpoint_url: str | None = None) -> Output:
    """`--out`: a directory, or s3://bucket/prefix."""
    if out.startswith("s3://"):
        return BucketOutput(out, endpoint_url)
    if "://" in out:
        raise ValueError(f"--out {out!r}: a directory or s3://bucket/prefix")
    return DirectoryOutput(out)


def put_json(output: Output, name: str, record: Any) -> str:
    return output.put(name, (json.dumps(record, indent=1) + "\n").encode(), "application/json")


def get_json(output: Output, name: str) -> Any | None:
    data = output.get(name)
    return None if data is None else json.loads(data)


def shard_name(shard: int, kind: str) -> str:
    return (f"batch/shard-{shard:06d}.jsonl" if kind == "batch"
            else f"shards/shard-{shard:06d}.npz")
