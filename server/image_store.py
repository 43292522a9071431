"""Images returned as URLs: files on disk under unguessable ids, deleted after a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from pathlib import Path

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")


class ImageStore:
    def __init__(self, directory: Path, ttl_s: float):
        self.directory, self.ttl_s = directory, ttl_s
        directory.mkdir(parents=True, exist_ok=True)
        self._task: asyncio.Task[None] | None = None

    def save(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_hex(16)}.{EXTENSIONS[fmt]}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)  # readers never see a partial file
        return name

    def path(self, name: str) -> Path | None:
        """The file for `name`, or None if unknown, malformed or expired."""
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
        return path

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
