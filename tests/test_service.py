"""ModelService logic without an engine: health verdicts, admission, preview rows."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from engine.service import ModelService, QueueFull, preview_rows
from engine.settings import ServiceSettings
from engine.vllm_api import AsyncEngine
from server.errors import ServiceError


class FakeAsyncLLM:
    """What AsyncEngine reads of vLLM's AsyncLLM to judge its health."""

    def __init__(self, errored: bool = False, hang: bool = False):
        self.errored, self.hang = errored, hang
        self.dead_error = RuntimeError("EngineCore died")

    async def check_health(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)


def fake_engine(**kwargs: bool) -> AsyncEngine:
    engine = AsyncEngine.__new__(AsyncEngine)  # the real wrapper around a fake AsyncLLM
    engine._llm = FakeAsyncLLM(**kwargs)
    return engine


def service(**settings: object) -> ModelService:
    model = SimpleNamespace(name=f"m{time.monotonic_ns()}", image_size=64)
    return ModelService(model, ServiceSettings(**settings))  # type: ignore[arg-type]


def test_health_dead_wedged_and_ok():
    s = service(health_stall_s=1.0)
    assert asyncio.run(s.check_health()) == "engine not started"
    s.engine = fake_engine(errored=True)
    assert "engine dead" in asyncio.run(s.check_health())
    s.engine = fake_engine()
    assert asyncio.run(s.check_health()) is None
    s.in_flight, s.last_progress = 3, time.monotonic() - 5
    assert "wedged" in asyncio.run(s.check_health())
    s.in_flight = 0  # nothing in flight: no progress expected
    assert asyncio.run(s.check_health()) is None


def test_admission_reserves_and_releases():
    s = service(max_queued_images=12)
    first = s.admit(10)
    with pytest.raises(QueueFull) as e:
        s.admit(3)
    assert e.value.retry_after_s >= 1
    refusal = ServiceError.queue_full(e.value)  # what the client gets
    assert refusal.status == 429 and int(refusal.headers["Retry-After"]) >= 1
    with s.admit(2):
        assert s.in_flight == 12
    first.release()
    first.release()  # idempotent
    assert s.in_flight == 0


def test_preview_rows_are_evenly_spaced():
    assert preview_rows(16, 3) == [4, 8, 12]
    assert preview_rows(16, 1) == [8]
    assert preview_rows(8, 3) == [2, 4, 6]
    assert preview_rows(2, 3) == [1, 1, 1]
    assert preview_rows(16, 0) == []
    # A completion's previews are spread over the rows it generates.
    assert preview_rows(8, 3, known_rows=4) == [5, 6, 7]
    assert preview_rows(16, 1, known_rows=8) == [12]
    assert preview_rows(8, 3, known_rows=7) == [8, 8, 8]  # with the final image
