"""LoRA adapters of a served model: which are loaded, under what names, and vLLM's handles.

An adapter is checked (`model_registry.lora.check_adapter`) and loaded into the engine when
it is added, so a bad one is refused with a clear message and nothing is loaded. At most
`max_loras` adapters are loaded at once, so all of them fit in one batch. Requests take an
adapter for their lifetime (`acquire`); an adapter unloaded meanwhile stops taking new
requests at once and leaves the engine when its last image finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.vllm_api import lora_request
from model_registry.lora import AdapterError, AdapterInfo, check_adapter
from model_registry.model_dir import ModelDir

log = logging.getLogger("llamagen.adapters")
_ids = itertools.count(1)  # vLLM's lora_int_id: positive, unique in the process


class AdapterNotFound(KeyError):
    pass


@dataclass(frozen=True)
class Adapter:
    name: str
    lora_id: int
    info: AdapterInfo

    @property
    def request(self) -> Any:
        return lora_request(self.name, self.lora_id, str(self.info.path))

    def describe(self) -> dict[str, Any]:
        """What an image's provenance records of it."""
        return {"name": self.name, "sha256": self.info.sha256, "rank": self.info.rank,
                "alpha": self.info.alpha}


def offline_adapter(model: ModelDir, path: str | Path, max_rank: int,
                    name: str | None = None) -> Adapter:
    """A checked adapter for an offline engine (which loads it with its first request);
    named after its directory unless `name`."""
    info = check_adapter(Path(path), model.gpt, max_rank)
    return Adapter(name or info.path.name, next(_ids), info)


class AdapterRegistry:
    def __init__(self, model: ModelDir, max_loras: int, max_rank: int,
                 add: Callable[[Any], Awaitable[None]] | None = None,
                 remove: Callable[[int], Awaitable[None]] | None = None):
        """add/remove: load into and drop from the engine (None: an offline engine, which
        loads an adapter with its first request)."""
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self._add, self._remove = add, remove
        self._adapters: dict[str, Adapter] = {}
        self._retiring: dict[str, Adapter] = {}  # unloaded, images still in flight
        self._in_flight: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def list(self) -> list[Adapter]:
        return list(self._adapters.values())

    def check(self, path: str | Path) -> AdapterInfo:
        return check_adapter(Path(path), self.model.gpt, self.max_rank)

    async def load(self, name: str, path: str | Path) -> Adapter:
        """Check and load the adapter at `path` as `name` (AdapterError saying why not)."""
        async with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            if len(self._adapters) + len(self._retiring) >= self.max_loras:
                raise AdapterError(f"{self.max_loras} adapters are loaded (--max-loras); "
                                   "unload one first")
            info = await asyncio.to_thread(self.check, path)
            adapter = Adapter(name, next(_ids), info)
            if self._add is not None:
                try:
                    await self._add(adapter.request)
                except Exception as e:
                    log.exception("vLLM refused the adapter %s", name)
                    raise AdapterError(f"the engine could not load {path}") from e
            self._adapters[name] = adapter
            log.info("adapter %s loaded from %s (rank %d, sha256 %s)", name, info.path,
                     info.rank, info.sha256[:12])
            return adapter

    async def unload(self, name: str) -> None:
        """Stop serving `name` (AdapterNotFound); the engine drops it once idle."""
        async with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise AdapterNotFound(name)
            if self._in_flight.get(name, 0):
                self._retiring[name] = adapter
            else:
                await self._drop(adapter)

    async def _drop(self, adapter: Adapter) -> None:
        self._in_flight.pop(adapter.name, None)
        if self._remove is not None:
            await self._remove(adapter.lora_id)
        log.info("adapter %s unloaded", adapter.name)

    def acquire(self, adapter: Adapter) -> Callable[[], None]:
        """Count a request on the adapter; the callable (call it once) ends it."""
        self._in_flight[adapter.name] = self._in_flight.get(adapter.name, 0) + 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._in_flight[adapter.name] -= 1
            if not self._in_flight[adapter.name] and self._retiring.get(adapter.name) is adapter:
                del self._retiring[adapter.name]
                task = asyncio.get_running_loop().create_task(self._drop(adapter))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

        return release
