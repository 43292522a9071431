"""Faults, injected into the real app and services around a stand-in engine (no vLLM, so
each runs in a second): a failing decode or caption encode fails only the requests it
touched, with a 500 that carries the request id; a dead worker turns /health to 503; a
passed deadline aborts with a 504; a dead engine is a 503 envelope, /ready fails and the
server is asked to stop; a decoder that lags behind the engine still sends every preview,
from fewer decodes. The real engine killed under load is in test_faults_server.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from engine.captions import CaptionService
from engine.conditions import Condition
from engine.decoding import DecoderService
from engine.service import ModelService
from engine.vllm_api import EngineDead
from server.app import create_app, watch_engines
from server.settings import ServerSettings

from .helpers import decode_b64


class StandInEngine:
    """engine.vllm_api.AsyncEngine's interface: a whole grid of the class id at once, or a
    wait that never ends ("hang"), or a dead engine core ("dead"); or ("chunks") varied
    codes, delivered as the rows known at each output in `chunks` (vLLM merges the deltas a
    slow consumer has not taken yet into one output)."""

    def __init__(self, grid: int, vocab: int, mode: str = "ok",
                 chunks: tuple[int, ...] = ()):
        self.grid, self.vocab, self.mode, self.chunks = grid, vocab, mode, chunks
        self.errored = False
        self.dtype = torch.float32
        self.cancelled: list[str] = []  # requests whose generation was closed unfinished

    async def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
                       lora: Any = None) -> AsyncIterator[tuple[list[int], bool]]:
        if self.mode == "dead":
            self.errored = True
            raise EngineDead("the engine core died")
        try:
            if self.mode == "hang":
                await asyncio.sleep(3600)
            label = prompt["prompt_token_ids"][0] - self.vocab
            if self.mode == "chunks":
                codes = [(label + 7 * i) % self.vocab for i in range(self.grid ** 2)]
                sent = 0
                for rows in self.chunks:
                    yield codes[sent:rows * self.grid], rows == self.grid
                    sent = rows * self.grid
                return
            yield [label] * self.grid * self.grid, True
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request_id)  # AsyncLLM aborts the request here
            raise

    async def abort(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def health(self) -> str | None:
        return "engine dead: EngineDeadError" if self.errored else None

    def shutdown(self) -> None:
        pass


Scenario = Callable[[httpx.AsyncClient, ModelService, Any], Awaitable[None]]


def run_app(model, scenario: Scenario, *, mode: str = "ok", timeout_s: float = 60,
            fail_label: int | None = None, chunks: tuple[int, ...] = (),
            **settings_: Any) -> None:
    """The real app and ModelService with a stand-in engine and a real decoder service whose
    decode fails for grids of `fail_label`."""
    settings = ServerSettings(model=[model.path], request_timeout_s=timeout_s, c2pa=False,
                              api_key=None, **settings_)
    app = create_app(settings)
    state = app.state.llamagen

    async def main() -> None:
        service = ModelService(model, settings)
        service.engine = StandInEngine(model.grid_size, model.gpt.vocab_size, mode, chunks)
        decoder = model.vq_decoder(device="cpu", dtype=torch.float32)
        real = decoder.decode_uint8

        def decode(codes: torch.Tensor) -> torch.Tensor:
            if fail_label is not None and (codes == fail_label).any():
                raise RuntimeError("injected decode fault")
            return real(codes)

        decoder.decode_uint8 = decode  # type: ignore[method-assign]
        service.decoder = DecoderService(decoder, max_batch_size=1, invariant=True)
        await service.decoder.start()
        state.services, state.ready = {model.name: service}, True
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                await scenario(client, service, state)
        finally:
            await service.decoder.stop()

    asyncio.run(main())


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_a_failing_decode_fails_only_its_request_with_the_request_id(tiny_model):
    async def scenario(client, service, state):
        bad, good = await asyncio.gather(
            client.post("/v1/generate", json={"labels": [5]}, headers={"X-Request-Id": "bad-1"}),
            client.post("/v1/generate", json={"labels": [3, 4]},
                        headers={"X-Request-Id": "good-1"}))
        assert good.status_code == 200 and len(good.json()["images"]) == 2
        assert bad.status_code == 500 and bad.headers["x-request-id"] == "bad-1"
        error = bad.json()["error"]
        assert error["type"] == "server_error" and "bad-1" in error["message"]
        stream = await client.post("/v1/images/generations", headers={"X-Request-Id": "bad-2"},
                                   json={"prompt": "5", "stream": True})
        assert stream.status_code == 200  # the status line went out before the fault
        (name, data), = sse_events(stream.text)
        assert name == "error" and "bad-2" in data["error"]["message"]

    run_app(tiny_model, scenario, fail_label=5)


def test_a_dead_decoder_worker_fails_health_and_waiting_requests(tiny_model):
    async def scenario(client, service, state):
        assert (await client.get("/health")).status_code == 200
        batcher = service.decoder._batcher

        def broken() -> None:
            raise RuntimeError("injected batcher fault")

        batcher._next_batch = broken  # the loop itself dies on its next pass
        response = await client.post("/v1/generate", json={"labels": [1]})
        assert response.status_code == 500  # answered, not left waiting
        health = await client.get("/health")
        assert health.status_code == 503
        assert "DecoderService worker is not running" in health.json()["models"][service.name]

    run_app(tiny_model, scenario)


def test_a_failing_caption_encode_fails_only_its_request_and_a_dead_worker_shows():
    class Encoder:
        def encode(self, texts: list[str]) -> list:
            if "boom" in texts:
                raise RuntimeError("injected T5 fault")
            return [type("Caption", (), {"text": t, "features": torch.ones(2, 4)})()
                    for t in texts]

    async def main() -> None:
        captions = CaptionService(Encoder(), torch.nn.Linear(4, 8), max_batch_size=1)
        await captions.start()
        ok, failed = await asyncio.gather(captions.encode(["a cat"]), captions.encode(["boom"]),
                                          return_exceptions=True)
        assert isinstance(ok, list) and isinstance(ok[0], Condition)
        assert isinstance(failed, RuntimeError)
        assert captions.alive
        captions._batcher._next_batch = lambda: 1 / 0  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="caption service failed"):
            await asyncio.wait_for(captions.encode(["a dog"]), timeout=5)
        assert not captions.alive
        await captions.stop()

    asyncio.run(main())


@pytest.mark.parametrize("chunks", [(4, 8, 12, 16), (4, 13, 16), (4, 16), (16,)])
def test_previews_due_together_share_one_decode(tiny_model, chunks):
    """A decoder slower than the engine: every preview is still sent, in order, each showing
    its own rows (4, 8 and 12 of 16); those that came due at one engine output share one
    decode of all the rows known then, and those due with the last tokens show the final
    picture's."""
    from engine.service import preview_grid

    grid, ds = tiny_model.grid_size, tiny_model.image_size // tiny_model.grid_size
    decoded: list[torch.Tensor] = []

    async def scenario(client, service, state):
        decoder = service.decoder.decoder
        real = decoder.decode_uint8

        def decode(codes: torch.Tensor) -> torch.Tensor:
            decoded.append(codes.clone())
            return real(codes)

        decoder.decode_uint8 = decode
        response = await client.post("/v1/generate", json={
            "labels": [5], "stream": True, "partial_images": 3, "return_tokens": True})
        events = [json.loads(line[5:]) for line in response.text.splitlines()
                  if line.startswith("data:")]
        assert [e["type"] for e in events] == ["partial_image"] * 3 + ["image", "done"]
        tokens = events[3]["tokens"]
        final = real(torch.tensor(tokens).view(1, grid, grid)).numpy()[0]
        assert (np.asarray(decode_b64(events[3]["b64_json"])[0]) == final).all()
        known_at = {rows: next(c for c in chunks if c >= rows) for rows in (4, 8, 12)}
        previews = sorted(set(known_at.values()) - {grid})
        # One decode per engine output that brought previews due, plus the final image.
        assert [d.view(-1).tolist() for d in decoded] == [
            preview_grid(tokens, known, grid) for known in previews] + [tokens]
        for event, rows in zip(events[:3], (4, 8, 12), strict=True):
            known = known_at[rows]
            source = final if known == grid else real(
                torch.tensor(preview_grid(tokens, known, grid)).view(1, grid, grid)).numpy()[0]
            picture = np.asarray(decode_b64(event["b64_json"])[0])
            assert (picture[:rows * ds] == source[:rows * ds]).all()
            assert (picture[rows * ds:] == 128).all()

    run_app(tiny_model, scenario, mode="chunks", chunks=chunks)


def test_a_passed_deadline_aborts_the_generation_with_504(tiny_model):
    async def scenario(client, service, state):
        response = await client.post("/v1/generate", json={"labels": [1, 2]},
                                     headers={"X-Request-Id": "slow"})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "request_timeout"
        assert sorted(service.engine.cancelled) == ["slow-0", "slow-1"]  # aborted in vLLM
        assert service.in_flight == 0  # and released
        stream = await client.post("/v1/images/generations",
                                   json={"prompt": "1", "stream": True})
        ((name, data),) = sse_events(stream.text)
        assert name == "error" and data["error"]["code"] == "request_timeout"

    run_app(tiny_model, scenario, mode="hang", timeout_s=0.3)


def test_a_dead_engine_is_a_503_then_ready_fails_and_the_server_stops(tiny_model):
    async def scenario(client, service, state):
        response = await client.post("/v1/images/generations", json={"prompt": "1"})
        assert response.status_code == 503 and "retry-after" in response.headers
        assert response.json()["error"]["code"] == "engine_unavailable"
        stopped = []
        state.stop_server = lambda: stopped.append(True)
        await asyncio.wait_for(watch_engines(state), timeout=5)
        assert stopped == [True] and "died" in state.engine_dead
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "engine_dead"
        assert (await client.get("/health")).status_code == 503
        again = await client.post("/v1/generate", json={"labels": [1]})
        assert again.status_code == 503
        assert again.json()["error"]["code"] == "engine_unavailable"

    run_app(tiny_model, scenario, mode="dead")


def test_streams_beyond_the_cap_get_429(tiny_model):
    async def scenario(client, service, state):
        body = {"prompt": "1", "stream": True}
        held = [asyncio.create_task(client.post("/v1/images/generations", json=body))
                for _ in range(2)]
        for _ in range(100):
            if state.open_streams == 2:
                break
            await asyncio.sleep(0.02)
        assert state.open_streams == 2
        refused = await client.post("/v1/images/generations", json=body)
        assert refused.status_code == 429 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert service.in_flight == 2  # the refused request's images were released
        for done in await asyncio.gather(*held):  # they end at their deadline
            assert "request_timeout" in done.text
        assert state.open_streams == 0

    run_app(tiny_model, scenario, mode="hang", timeout_s=1.0, max_streams=2)
