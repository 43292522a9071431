"""Images returned as URLs, under unguessable ids, kept for `--image-ttl-s`.

Two stores behind one interface:

- a local directory (the embedded default, `--image-dir`): one replica's own files;
- S3-compatible object storage (`--image-store s3://bucket/prefix`, through boto3, AWS's own
  client: the standard credential chain, `--image-store-endpoint` or `AWS_ENDPOINT_URL` for
  MinIO, Ceph, R2 or GCS interop). Every replica reads the same bucket, so a URL issued by
  one is served by any: `GET /v1/images/files/{id}` streams the object (behind the API key,
  as before), rather than a presigned URL that would bypass it.

Expiry: a file older than the TTL is never served (checked on every read); the local store
also deletes it, and a bucket should carry a lifecycle rule that deletes objects under the
prefix after a day (docs/DEPLOY.md), since S3 expires objects only in whole days.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from vq_decoder.encoding import BY_EXTENSION, IMAGE_FORMATS, FormatSpec

NAME = re.compile(rf"^[0-9a-f]{{32}}\.({'|'.join(BY_EXTENSION)})$")


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or refused the operation."""


def new_name(fmt: str) -> str:
    return f"{secrets.token_hex(16)}.{IMAGE_FORMATS[fmt].extension}"


class ImageStore(Protocol):
    async def start(self) -> None:
        """Check the store is usable (raise StoreUnavailable saying why) and begin upkeep."""

    async def stop(self) -> None: ...

    async def save(self, data: bytes, fmt: str) -> str:
        """Store an image; its name (the URL's id)."""

    async def get(self, name: str) -> tuple[bytes, FormatSpec] | None:
        """The image and its format; None if unknown, malformed or expired."""


class LocalImageStore:
    def __init__(self, directory: Path, ttl_s: float):
        self.directory, self.ttl_s = directory, ttl_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

        async def sweeper() -> None:
            while True:
                await asyncio.sleep(min(self.ttl_s, 60))
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self.sweep)

        self._task = asyncio.create_task(sweeper(), name="image-store-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def save(self, data: bytes, fmt: str) -> str:
        return await asyncio.to_thread(self._save, data, fmt)

    def _save(self, data: bytes, fmt: str) -> str:
        name = new_name(fmt)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)  # readers never see a partial file
        return name

    async def get(self, name: str) -> tuple[bytes, FormatSpec] | None:
        return await asyncio.to_thread(self._get, name)

    def _get(self, name: str) -> tuple[bytes, FormatSpec] | None:
        if not NAME.match(name):
            return None
        path = self.directory / name
        try:
            age = time.time() - path.stat().st_mtime
            if age > self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes(), BY_EXTENSION[path.suffix[1:]]
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        now, removed = time.time(), 0
        for path in self.directory.iterdir():
            if NAME.match(path.name) and now - path.stat().st_mtime > self.ttl_s:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class Bucket:
    """An S3-compatible bucket under a prefix, through boto3 (AWS's own client: the standard
    credential chain; `endpoint_url` or AWS_ENDPOINT_URL for MinIO, Ceph, R2 or GCS interop).
    The image store's client, and `llamagen sample`'s output; every failure is a
    StoreUnavailable naming the URL."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{url!r}: expected s3://bucket/prefix")
        self.url = url
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        # Short timeouts and few retries: a request waiting on a dead store should get its
        # 503 in seconds, not minutes.
        config = Config(connect_timeout=3, read_timeout=10,
                        retries={"max_attempts": 2, "mode": "standard"})
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            why = {"404": "the bucket does not exist", "NoSuchBucket": "the bucket does not "
                   "exist", "403": "access denied (check the credentials)"}.get(code, str(e))
            raise StoreUnavailable(f"{self.url}: {why}") from e
        except BotoCoreError as e:  # no credentials, unreachable endpoint, ...
            raise StoreUnavailable(f"{self.url}: {e}") from e

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self._call("put_object", Bucket=self.bucket, Key=self.key(name), Body=data,
                   ContentType=content_type)

    def put_file(self, name: str, path: Path) -> None:
        """A large file, in parts where it needs them (boto3's managed transfer)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.upload_file(str(path), self.bucket, self.key(name))
        except (BotoCoreError, ClientError, S3UploadFailedError) as e:
            raise StoreUnavailable(f"{self.url}: {e}") from e

    def get(self, name: str) -> dict | None:
        """The object (boto3's get_object answer), None when there is none."""
        from botocore.exceptions import ClientError

        try:
            return self._call("get_object", Bucket=self.bucket, Key=self.key(name))
        except StoreUnavailable as e:
            cause = e.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get(
                    "Code") in ("NoSuchKey", "404"):
                return None
            raise

    def _call(self, method: str, **kwargs: object) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._s3, method)(**kwargs)
        except (BotoCoreError, ClientError) as e:
            raise StoreUnavailable(f"{self.url}: {e}") from e


class S3ImageStore:
    def __init__(self, url: str, ttl_s: float, endpoint_url: str | None = None):
        try:
            self.bucket = Bucket(url, endpoint_url)
        except ValueError as e:
            raise ValueError(f"image store {e}") from None
        self.url, self.ttl_s = url, ttl_s

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.bucket.check)
        except StoreUnavailable as e:
            raise StoreUnavailable(f"image store {e}") from e

    async def stop(self) -> None:
        pass

    async def save(self, data: bytes, fmt: str) -> str:
        name = new_name(fmt)
        await asyncio.to_thread(self.bucket.put, name, data, IMAGE_FORMATS[fmt].media_type)
        return name

    async def get(self, name: str) -> tuple[bytes, FormatSpec] | None:
        if not NAME.match(name):
            return None
        return await asyncio.to_thread(self._get, name)

    def _get(self, name: str) -> tuple[bytes, FormatSpec] | None:
        obj = self.bucket.get(name)
        if obj is None:
            return None
        age = (datetime.now(UTC) - obj["LastModified"]).total_seconds()
        if age > self.ttl_s:
            return None
        return obj["Body"].read(), BY_EXTENSION[name.rsplit(".", 1)[1]]


def open_image_store(store: str | None, directory: Path, ttl_s: float,
                     endpoint_url: str | None = None) -> ImageStore:
    """`--image-store`: None for the local directory, or an s3:// URL."""
    if store is None:
        return LocalImageStore(directory, ttl_s)
    return S3ImageStore(store, ttl_s, endpoint_url)
