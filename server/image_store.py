"""Images returned as URLs: files on disk under unguessable ids, deleted after a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from pathlib import Path

from vq_decoder.encoding import BY_EXTENSION, IMAGE_FORMATS, FormatSpec

NAME = re.compile(rf"^[0-9a-f]{{32}}\.({'|'.join(BY_EXTENSION)})$")


class ImageStore:
    def __init__(self, directory: Path, ttl_s: float):
        self.directory, self.ttl_s = directory, ttl_s
        directory.mkdir(parents=True, exist_ok=True)
        self._task: asyncio.Task[None] | None = None

    def save(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_hex(16)}.{IMAGE_FORMATS[fmt].extension}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)  # readers never see a partial file
        return name

    def path(self, name: str) -> tuple[Path, FormatSpec] | None:
        """The file for `name` and its format, or None if unknown, malformed or expired."""
        if not NAME.match(name):
            return None
        path = self.directory / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        return path, BY_EXTENSION[path.suffix[1:]]

    def sweep(self) -> int:
        now, removed = time.time(), 0
        for path in self.directory.iterdir():
            if NAME.match(path.name) and now - path.stat().st_mtime > self.ttl_s:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(min(self.ttl_s, 60))
                with contextlib.suppress(OSError):
                    self.sweep()

        self._task = asyncio.create_task(loop(), name="image-store-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
