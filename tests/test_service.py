"""ModelService logic without an engine: health verdicts, admission, preview rows."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from server.service import ModelService, ServiceError, preview_rows
from server.settings import ServerSettings


class FakeEngine:
    def __init__(self, errored: bool = False, hang: bool = False):
        self.errored, self.hang = errored, hang
        self.dead_error = RuntimeError("EngineCore died")

    async def check_health(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)


def service(**settings: object) -> ModelService:
    model = SimpleNamespace(name=f"m{time.monotonic_ns()}", image_size=64)
    return ModelService(model, ServerSettings(**settings))  # type: ignore[arg-type]


def test_health_dead_wedged_and_ok():
    s = service(health_stall_s=1.0)
    assert asyncio.run(s.check_health()) == "engine not started"
    s.engine = FakeEngine(errored=True)
    assert "engine dead" in asyncio.run(s.check_health())
    s.engine = FakeEngine()
    assert asyncio.run(s.check_health()) is None
    s.in_flight, s.last_progress = 3, time.monotonic() - 5
    assert "wedged" in asyncio.run(s.check_health())
    s.in_flight = 0  # nothing in flight: no progress expected
    assert asyncio.run(s.check_health()) is None


def test_admission_reserves_and_releases():
    s = service(max_queued_images=12, max_images_per_request=10)
    first = s.admit(10)
    with pytest.raises(ServiceError) as e:
        s.admit(3)
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
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
