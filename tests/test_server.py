"""The HTTP server, as users reach it: the official `openai` client, httpx, a real uvicorn
process on a tiny converted model. One server for the module; the drain test stops it last."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from vq_decoder.encoding import DIGITAL_SOURCE_TYPE, EDITED_SOURCE_TYPE, read_metadata

from .helpers import (
    API_KEY,
    TINY_VQ,
    ServerProcess,
    assert_openai,
    assert_pixels_close,
    data_url,
    decode_b64,
    deploy_metric_names,
    mask_from_row,
    metric,
    pixels_close,
    png_bytes,
    read_credentials,
    sse_payloads,
    tiny_config,
)

# API keys with tiers (--api-keys-file), beside the operator's --api-key (named `default`).
BULK_KEY, WEB_KEY, LATE_KEY = "sk-bulk-0123456789", "sk-web-0123456789", "sk-late-0123456789"
KEYS = [{"name": "bulk", "key": BULK_KEY, "default_priority": 10, "max_priority": 5,
         "images_per_minute": 4, "max_images_in_flight": 3},
        {"name": "web", "sha256": hashlib.sha256(WEB_KEY.encode()).hexdigest(),
         "default_priority": -10}]

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "crane", "crane",
         "purple heart", "orange ring", "black cross", "white moon"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    from model_registry.convert import convert
    from model_registry.synthetic import save_gpt_checkpoint, save_vq_checkpoint

    root = tmp_path_factory.mktemp("served")
    cfg = tiny_config(16)
    (root / "classes.txt").write_text("".join(f"{i}, {n}\n" for i, n in enumerate(NAMES)))
    return convert(save_gpt_checkpoint(cfg, root / "gpt.pt", seed=1),
                   json.dumps(cfg.to_dict()), root / "shapes",
                   vq_checkpoint=save_vq_checkpoint(TINY_VQ, root / "vq.pt", seed=1),
                   vq_model=json.dumps(TINY_VQ.to_dict()), class_names=root / "classes.txt")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    path.write_text("# tiers\n" + "".join(json.dumps(k) + "\n" for k in KEYS))
    return path


@pytest.fixture(scope="module")
def served_adapters(served_model, tmp_path_factory):
    """PEFT adapters of the served model: one served from the start, one loaded at run
    time, one of too high a rank."""
    from model_registry.synthetic import save_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {"style-a": save_lora_adapter(served_model, root / "style-a", rank=4, seed=1),
            "style-b": save_lora_adapter(served_model, root / "style-b", rank=8, seed=2,
                                         targets=("wqkv", "w2")),
            "too-big": save_lora_adapter(served_model, root / "too-big", rank=16, seed=3)}


@pytest.fixture(scope="module")
def server(served_model, keys_file, served_adapters, tmp_path_factory):
    with ServerProcess([served_model.path], tmp_path_factory.mktemp("server"),
                       "--lora-modules", f"style-a={served_adapters['style-a']}",
                       "--allow-runtime-lora-updating", "--max-lora-rank", "8",
                       "--scheduling-policy", "priority", "--api-keys-file", str(keys_file),
                       "--api-keys-reload-s", "600",  # the reload test sends SIGHUP
                       "--max-num-seqs", "8", "--max-queued-images", "12",
                       "--max-body-bytes", "4096", "--drain-timeout-s", "60",
                       "--max-upload-bytes", "200000",
                       # fp32 previews: the preview test below compares them with its own
                       # decodes, and a bf16 decode depends on the thread count, which this
                       # process cannot set once an in-process vLLM engine has run in it
                       # (vLLM's CPU worker replaces torch.set_num_threads with a no-op).
                       "--decoder-preview-dtype", "float32",
                       "--decoder-max-batch", "4",
                       # The names clients hard-code, and the one host edits may fetch from
                       # (an image server on 127.0.0.2, below); `localhost` is allowed as a
                       # host but its address is not.
                       "--served-model-name", "shapes", "dall-e-2", "gpt-image-1",
                       "--image-url-hosts", "127.0.0.2", "localhost",
                       "--image-url-networks", "127.0.0.2/32",
                       "--image-url-timeout-s", "2") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_openai_client_b64_images_with_provenance(client, served_model):
    result = client.images.generate(model="shapes", prompt="yellow star", n=2, size="256x256",
                                    extra_body={"seed": 42, "cfg_scale": 3.0, "top_k": 100})
    assert len(result.data) == 2 and result.size == "256x256"
    assert result.usage.output_tokens == 2 * 256
    seeds = [img.model_extra["seed"] for img in result.data]
    assert seeds == [42, 43]
    for img in result.data:
        image, data = decode_b64(img.b64_json)
        assert image.size == (256, 256) and image.format == "PNG"
        meta = read_metadata(data)
        assert meta["class_label"] == 3 and meta["class_name"] == "yellow star"
        assert meta["checkpoint_sha256"] == served_model.gpt_sha256
        assert meta["sampling"]["cfg_scale"] == 3.0 and meta["seed"] in (42, 43)
        assert meta["xmp_digital_source_type"] == DIGITAL_SOURCE_TYPE
    # The reported seed regenerates the image: the same tokens; the pixels up to float noise
    # when the grid is decoded in another micro-batch (at most 1 level, in 0.1% of values).
    again = client.images.generate(model="shapes", prompt="3", n=1,
                                   extra_body={"seed": 43, "cfg_scale": 3.0, "top_k": 100})
    assert_pixels_close(np.asarray(decode_b64(result.data[1].b64_json)[0]),
                        np.asarray(decode_b64(again.data[0].b64_json)[0]))


def test_openai_client_url_images(client, server):
    result = client.images.generate(prompt="2", response_format="url", output_format="webp",
                                    extra_body={"seed": 1})
    url = result.data[0].url
    assert url.startswith(f"{server.url}/v1/images/files/") and url.endswith(".webp")
    response = httpx.get(url, headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)
    assert httpx.get(url).status_code == 401
    missing = httpx.get(f"{server.url}/v1/images/files/{'0' * 32}.png", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_found"


def test_openai_client_streaming_previews(client):
    stream = client.images.generate(prompt="green triangle", n=2, stream=True,
                                    partial_images=3, output_format="jpeg",
                                    extra_body={"seed": 5})
    events = list(stream)
    for index in (0, 1):
        mine = [e for e in events if e.model_extra.get("image_index") == index]
        assert [e.type for e in mine] == ["image_generation.partial_image"] * 3 + [
            "image_generation.completed"]
        assert [e.partial_image_index for e in mine[:3]] == [0, 1, 2]
        for e in mine:
            image, _ = decode_b64(e.b64_json)
            assert image.size == (256, 256) and image.format == "JPEG"
        assert mine[-1].usage.output_tokens == 256
        assert mine[-1].model_extra["seed"] == 5 + index


def test_every_served_image_is_signed(client, server):
    """b64, url and stream completions carry a C2PA manifest that validates (the test
    server signs with development credentials made in its work directory)."""
    def generation(data: bytes, fmt: str) -> dict:
        state, manifest = read_credentials(data, fmt)
        assert state == "Valid"
        (record,) = [a["data"] for a in manifest["assertions"]
                     if a["label"] == "org.llamagen.generation"]
        return record

    b64 = client.images.generate(prompt="red circle", extra_body={"seed": 3})
    assert generation(decode_b64(b64.data[0].b64_json)[1], "png")["seed"] == 3
    url = client.images.generate(prompt="1", response_format="url", output_format="webp",
                                 extra_body={"seed": 4}).data[0].url
    assert generation(httpx.get(url, headers=AUTH).content, "webp")["seed"] == 4
    (done,) = list(client.images.generate(prompt="2", stream=True, output_format="jpeg",
                                          extra_body={"seed": 5}))
    assert generation(decode_b64(done.b64_json)[1], "jpeg")["class_label"] == 2


def test_same_seed_same_pixels_whatever_else_is_in_flight(server):
    """20 repeats of one seeded request, interleaved with 20 other requests (decode batches
    of 4, filled differently each time): pixel-identical every time."""
    async def run() -> list[np.ndarray]:
        gate = asyncio.Semaphore(5)  # stay under the server's queue limit
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            async def post(body: dict) -> dict:
                async with gate:
                    response = await http.post(f"{server.url}/v1/images/generations",
                                               json=body)
                assert response.status_code == 200, response.text
                return response.json()

            seeded = [post({"prompt": "yellow star", "seed": 1234}) for _ in range(20)]
            others = [post({"prompt": str(i % 10), "n": 1 + i % 3}) for i in range(20)]
            mixed = [task for pair in zip(seeded, others, strict=True) for task in pair]
            results = await asyncio.gather(*mixed)
        return [np.asarray(decode_b64(r["data"][0]["b64_json"])[0]) for r in results[::2]]

    images = asyncio.run(run())
    assert all(np.array_equal(images[0], image) for image in images[1:])


def test_openai_stream_without_partials(client):
    events = list(client.images.generate(prompt="1", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_models_endpoint(client):
    models = client.models.list()
    # The model, then its LoRA adapter (--lora-modules), which names it as parent.
    assert [m.id for m in models.data] == ["shapes", "style-a"]
    assert [m.model_extra.get("parent") for m in models.data] == [None, "shapes"]
    assert models.data[0].object == "model" and models.data[0].owned_by


def test_native_same_seed_same_tokens(server):
    body = {"labels": [2, 2], "seed": 77, "top_k": 50, "return_tokens": True}
    runs = [httpx.post(f"{server.url}/v1/generate", json=b, headers=AUTH, timeout=120).json()
            for b in (body, {**body, "labels": [2]})]
    assert [img["seed"] for img in runs[0]["images"]] == [77, 78]
    assert runs[1]["images"][0]["tokens"] == runs[0]["images"][0]["tokens"]
    assert runs[0]["images"][0]["tokens"] != runs[0]["images"][1]["tokens"]


def test_native_api_labels_tokens_and_names(server, served_model):
    body = {"labels": [0, "Blue Square", "9"], "greedy": True, "cfg_scale": 2.0,
            "return_tokens": True}
    response = httpx.post(f"{server.url}/v1/generate", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    out = response.json()
    assert [img["class_label"] for img in out["images"]] == [0, 1, 9]
    assert out["images"][1]["class_name"] == "blue square"
    import torch

    from model_registry.generate import generate

    ref = served_model.load_reference()
    expected = generate(ref, torch.tensor([0, 1, 9]), cfg_scale=2.0, greedy=True).tolist()
    assert [img["tokens"] for img in out["images"]] == expected
    decoder = served_model.vq_decoder(device="cpu", dtype=torch.float32)
    pixels = decoder.decode_uint8(torch.tensor(expected).view(3, 16, 16)).numpy()
    for img, want in zip(out["images"], pixels, strict=True):
        # Decoded in the server's micro-batch: equal up to float noise.
        assert_pixels_close(np.asarray(decode_b64(img["b64_json"])[0]), want)


def test_native_stream_previews_are_decodes_of_the_rows_so_far(server, served_model):
    """Each preview shows its rows of a whole-grid decode (the rows not generated yet
    mirrored, engine.service.preview_grid), grey below. (bf16 previews: tests/test_demo.py,
    tests/test_vq_decoder.py.)"""
    import torch

    from engine.service import preview_grid

    body = {"labels": [4], "stream": True, "partial_images": 2, "seed": 9,
            "return_tokens": True}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, headers=AUTH,
                      timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines()
                  if line.startswith("data:")]
    assert [e["type"] for e in events] == ["partial_image", "partial_image", "image", "done"]
    decoder = served_model.vq_decoder(device="cpu", dtype=torch.float32)
    tokens, final = events[2]["tokens"], np.asarray(decode_b64(events[2]["b64_json"])[0])
    for event, rows in zip(events[:2], (5, 10), strict=True):  # 1/3 and 2/3 of 16 rows
        preview = np.asarray(decode_b64(event["b64_json"])[0])
        # Decoded from the rows known when it came due: its own, more if vLLM ran ahead of
        # the decoder, or the final picture if it came due with the last tokens.
        sources = [final] + [decoder.decode_uint8(torch.tensor(preview_grid(
            tokens, known, 16)).view(1, 16, 16)).numpy()[0] for known in range(rows, 16)]
        assert any(pixels_close(preview[: rows * 16], s[: rows * 16]) for s in sources)
        assert (preview[rows * 16:] == 128).all()  # not generated yet: grey


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("kwargs,status,param", [
    ({"content": b'{"prompt": "1", "n": '}, 400, None),                      # malformed JSON
    ({"json": {"prompt": "1", "n": "two"}}, 400, "n"),                         # wrong type
    ({"json": {"prompt": 7}}, 400, "prompt"),
    ({"json": {"prompt": "1", "n": 0}}, 400, "n"),
    ({"json": {"prompt": "1", "n": 11}}, 400, "n"),
    ({"json": {"prompt": "1", "size": "512x384"}}, 400, "size"),            # not square
    ({"json": {"prompt": "1", "size": "4096x4096"}}, 400, "size"),          # over the cap
    ({"json": {"prompt": "1", "background": "transparent"}}, 400, "background"),
    ({"json": {"prompt": "1", "model": "dall-e-3"}}, 404, "model"),
    ({"json": {"prompt": "zebra"}}, 400, "prompt"),
    ({"json": {"prompt": "crane"}}, 400, "prompt"),                            # ambiguous
    ({"json": {"prompt": "1", "cfg_scale": -1}}, 400, "cfg_scale"),
    ({"json": {"prompt": "  "}}, 400, "prompt"),
    ({"json": {"prompt": "1", "colour": "red"}}, 400, "colour"),
    ({"json": {"prompt": "1", "partial_images": 4}}, 400, "partial_images"),
    ({"json": {"prompt": "1", "response_format": "gif"}}, 400, "response_format"),
    ({"json": {"prompt": "x" * 5000}}, 413, None),                            # > 4096 bytes
])
def test_bad_inputs_get_the_openai_envelope(server, kwargs, status, param):
    response = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=30,
                          **kwargs)
    error = error_of(response, status)
    if param is not None:
        assert error["param"] == param, error


def test_bad_input_messages_are_helpful(server):
    unknown = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                         json={"prompt": "red circel"}).json()["error"]
    assert "red circle" in unknown["message"]  # suggests the closest name
    ambiguous = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                           json={"prompt": "Crane"}).json()["error"]
    assert "4" in ambiguous["message"] and "5" in ambiguous["message"]
    size = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                      json={"prompt": "1", "size": "1792x1024"}).json()["error"]
    assert "256x256" in size["message"] and "2048x2048" in size["message"]
    native = httpx.post(f"{server.url}/v1/generate", headers=AUTH, json={"labels": [3, 99]})
    assert error_of(native, 400)["param"] == "labels.1"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}])
def test_api_key_required_on_v1(server, headers):
    for method, path in [("POST", "/v1/images/generations"), ("GET", "/v1/models"),
                         ("POST", "/v1/generate")]:
        response = httpx.request(method, f"{server.url}{path}", json={"prompt": "1"},
                                 headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_client_errors_map_to_sdk_exceptions(server):
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.images.generate(prompt="1")
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        good.images.generate(prompt="1", n=11)
    assert e.value.param == "n" or e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        good.images.generate(prompt="1", model="dall-e-3")  # not among the served names


def test_request_id_echoed_or_generated(server):
    given = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{server.url}/v1/models", headers=AUTH)
    assert len(made.headers["x-request-id"]) == 32
    bogus = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "X-Request-Id": "a b\tc"})
    assert bogus.headers["x-request-id"] != "a b\tc"


def test_operational_endpoints(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["models"] == ["shapes"]
    version = httpx.get(f"{server.url}/version").json()
    assert version["models"]["shapes"]["gpt_sha256"]


def _open_stream(server, n: int, **extra: object):
    """Start a streaming generation and return once its first preview arrived."""
    client = httpx.Client(timeout=120)
    body = {"labels": [0] * n, "stream": True, "partial_images": 3, "seed": 1, **extra}
    response = client.send(client.build_request("POST", f"{server.url}/v1/generate",
                                                json=body, headers=AUTH), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data:"):
            break
    return client, response, lines


def test_queue_overflow_gets_429_with_retry_after(server):
    before = metric(server.metrics(), "llamagen_admission_rejections_total")
    client, response, lines = _open_stream(server, 10)  # 10 of 12 slots taken
    try:
        refused = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                             json={"prompt": "1", "n": 3})
        error = error_of(refused, 429)
        assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
        ok = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                        json={"prompt": "1", "n": 2}, timeout=120)  # still fits
        assert ok.status_code == 200
    finally:
        for _ in lines:
            pass
        response.close()
        client.close()
    assert metric(server.metrics(), "llamagen_admission_rejections_total") == before + 1


def test_dropped_client_is_aborted_in_vllm(server):
    """A client that leaves while its 6 images are in vLLM: all 6 are aborted, KV freed.
    It leaves as soon as vLLM holds all 6, running or waiting (previews would make the moment
    depend on how fast the decoder is, and finished requests are no longer vLLM's to
    abort)."""
    before = metric(server.metrics(), "llamagen_requests_aborted_total")
    client = httpx.Client(timeout=120)
    body = {"labels": [0] * 6, "stream": True, "seed": 1}
    response = client.send(client.build_request("POST", f"{server.url}/v1/generate",
                                                json=body, headers=AUTH), stream=True)
    assert response.status_code == 200
    deadline = time.monotonic() + 30
    while True:
        samples = server.metrics()
        if (metric(samples, "vllm:num_requests_running")
                + metric(samples, "vllm:num_requests_waiting")) >= 6:
            break
        assert time.monotonic() < deadline, "the 6 images never reached vLLM"
        time.sleep(0.02)
    response.close()  # the client goes away mid-generation
    client.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        samples = server.metrics()
        if (metric(samples, "llamagen_requests_aborted_total") >= before + 6
                and metric(samples, "vllm:num_requests_running") == 0
                and metric(samples, "llamagen_queue_depth") == 0):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"not aborted: {samples}")
    assert metric(samples, "vllm:kv_cache_usage_perc") == 0  # KV blocks freed


# ---- edits: completion of an input image ----

def input_codes(served_model, pixels: np.ndarray) -> list[int]:
    """What the server's encoder makes of a model-sized image (in its batch of 4)."""
    import torch

    encoder = served_model.vq_encoder(device="cpu")
    batch = torch.from_numpy(pixels.copy())[None].repeat(4, 1, 1, 1)
    return encoder.encode_uint8(batch)[0].flatten().tolist()


@pytest.fixture(scope="module")
def source_image(server) -> tuple[bytes, np.ndarray]:
    """An image this server generated (PNG bytes, pixels): what users edit most."""
    body = {"labels": ["yellow star"], "seed": 21}
    image = httpx.post(f"{server.url}/v1/generate", json=body, headers=AUTH,
                       timeout=120).json()["images"][0]
    data = base64.b64decode(image["b64_json"])
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_openai_client_edit_is_the_completion_of_the_encoded_image(client, server,
                                                                   served_model, source_image):
    """An edit keeps the input's encoded top rows and completes the rest: greedy, it equals
    the native completion from the encoder's codes; its provenance says what was kept."""
    data, pixels = source_image
    result = client.images.edit(image=("star.png", data, "image/png"), prompt="blue square",
                                extra_body={"keep_rows": 6, "temperature": 0})
    (edited,) = result.data
    assert edited.model_extra["kept_rows"] == 6 and result.size == "256x256"
    # The kept tokens are input, the rest output.
    assert result.usage.input_tokens == 1 + 96 and result.usage.output_tokens == 256 - 96
    prefix = input_codes(served_model, pixels)[: 6 * 16]
    native = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120, json={
        "labels": ["blue square"], "prefix_tokens": [prefix], "greedy": True,
        "return_tokens": True}).json()["images"][0]
    assert native["tokens"][: 6 * 16] == prefix
    image, edited_data = decode_b64(edited.b64_json)
    assert_pixels_close(np.asarray(image), np.asarray(decode_b64(native["b64_json"])[0]))
    meta = read_metadata(edited_data)
    assert meta["edit"] == {"kept_rows": 6, "grid_rows": 16,
                            "source_sha256": hashlib.sha256(data).hexdigest()}
    assert meta["xmp_digital_source_type"] == EDITED_SOURCE_TYPE
    # Signed as an edit: c2pa.opened the input (a parent ingredient, itself signed by this
    # server), then c2pa.edited.
    state, manifest = read_credentials(edited_data, "png")
    assert state == "Valid"
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == EDITED_SOURCE_TYPE
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and "active_manifest" in ingredient
    # The native completion has no input file: it records the tokens it was given, and its
    # manifest says part of it was given (a composite), not that the model made all of it.
    native_data = base64.b64decode(native["b64_json"])
    given = json.dumps(prefix, separators=(",", ":")).encode()
    native_meta = read_metadata(native_data)
    assert native_meta["edit"] == {"kept_tokens": 96, "grid_tokens": 256,
                                   "prefix_sha256": hashlib.sha256(given).hexdigest()}
    assert native_meta["xmp_digital_source_type"] == EDITED_SOURCE_TYPE
    state, manifest = read_credentials(native_data, "png")
    assert state == "Valid" and not manifest.get("ingredients")
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert [(a["action"], a["digitalSourceType"]) for a in actions] == [
        ("c2pa.created", EDITED_SOURCE_TYPE)]
    assert "96 given image tokens" in actions[0]["description"]


def test_edit_mask_sets_the_kept_rows_and_other_sizes_are_fitted(client):
    """A 320x200 JPEG and its mask, transparent from y = 150 down: fitted by the centre-crop
    rule (scaled to 256 high: y 150 -> 192, token row 12)."""
    rng = np.random.default_rng(0)
    photo = png_bytes(rng.integers(0, 255, (200, 320, 3), dtype=np.uint8), fmt="JPEG")
    result = client.images.edit(image=("photo.jpg", photo, "image/jpeg"),
                                mask=("mask.png", mask_from_row(320, 200, 150), "image/png"),
                                prompt="3", output_format="webp", extra_body={"seed": 4})
    assert result.data[0].model_extra["kept_rows"] == 12
    image, data = decode_b64(result.data[0].b64_json)
    assert image.size == (256, 256) and image.format == "WEBP"
    assert read_metadata(data)["edit"]["kept_rows"] == 12


def test_openai_client_edit_streams_edit_events(client, source_image):
    stream = client.images.edit(image=("star.png", source_image[0], "image/png"), prompt="4",
                                stream=True, partial_images=2, extra_body={"seed": 8})
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + [
        "image_edit.completed"]
    assert events[-1].model_extra["kept_rows"] == 8  # the default: half the grid
    for e in events:
        assert decode_b64(e.b64_json)[0].size == (256, 256)
    # The previews show new rows: rows 8-15 are redrawn, previews at rows 10 and 13 (16 px
    # each), grey below.
    for e, rows in zip(events, [10, 13], strict=False):
        pixels = np.asarray(decode_b64(e.b64_json)[0])
        assert (pixels[rows * 16:] == 128).all() and (pixels[rows * 16 - 16:rows * 16] != 128).any()


def test_edits_count_their_encoder_time(server):
    samples = server.metrics()
    assert metric(samples, "llamagen_encoder_seconds_count", model="shapes") > 0
    assert metric(samples, "llamagen_encoder_batch_size_count", model="shapes") > 0


def _edit(server, files: dict, data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60, files=files,
                      data={"prompt": "1", **(data or {})})


def test_bad_edits_get_a_400_that_says_why_and_nothing_runs(server, source_image):
    png = source_image[0]
    big = png_bytes(np.random.default_rng(1).integers(0, 255, (300, 300, 3), np.uint8))
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, "GIF")
    opaque_mask = png_bytes(np.zeros((256, 256, 4), np.uint8) + 255, "RGBA")
    cases = [
        ({"image": ("a.txt", b"not an image at all", "text/plain")}, {}, "image",
         "not a readable image"),
        ({"image": ("a.gif", gif.getvalue(), "image/gif")}, {}, "image", "unsupported image"),
        ({"image": ("big.png", big, "image/png")}, {}, "image", "exceeds 200000 bytes"),
        ({"image": ("a.png", png, "image/png"),
          "mask": ("m.png", mask_from_row(128, 128, 10), "image/png")}, {}, "mask",
         "must match"),
        ({"image": ("a.png", png, "image/png"),
          "mask": ("m.png", png, "image/png")}, {}, "mask", "no alpha channel"),
        ({"image": ("a.png", png, "image/png"),
          "mask": ("m.png", opaque_mask, "image/png")}, {}, "mask", "nothing to redraw"),
        ({"image": ("a.png", png, "image/png"),
          "mask": ("m.png", mask_from_row(256, 256, 10), "image/png")}, {"keep_rows": "3"},
         "keep_rows", "not both"),
        ({"image": ("a.png", png, "image/png")}, {"keep_rows": "16"}, "keep_rows",
         "at most 15"),
        ({"image": ("a.png", png, "image/png")}, {"cfg_scale": "lots"}, "cfg_scale", None),
        ({"image": ("a.png", png, "image/png")}, {"colour": "red"}, "colour", None),
        ({"image": ("a.png", png, "image/png")}, {"prompt": "zebra"}, "prompt", None),
        ({"image": ("a.png", png, "image/png")}, {"n": "11"}, "n", None),
        ({"mask": ("m.png", mask_from_row(256, 256, 10), "image/png")}, {}, "image",
         "required"),
    ]
    before = metric(server.metrics(), "llamagen_encoder_seconds_count", model="shapes")
    for files, data, param, words in cases:
        error = error_of(_edit(server, files, data), 400)
        assert error["param"] == param, (param, error)
        if words:
            assert words in error["message"], error
    assert metric(server.metrics(), "llamagen_encoder_seconds_count", model="shapes") == before
    no_images = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=30,
                           json={"prompt": "1"})
    assert error_of(no_images, 400)["param"] == "images"
    not_a_form = httpx.post(f"{server.url}/v1/images/edits", timeout=30, content=b"prompt=1",
                            headers={**AUTH, "Content-Type": "text/plain"})
    assert "multipart/form-data" in error_of(not_a_form, 400)["message"]


def test_native_prefix_tokens_are_checked(server):
    def native(prefixes: list) -> dict:
        return error_of(httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=30,
                                   json={"labels": [1], "prefix_tokens": prefixes}), 400)

    assert native([[1, 2, 256]])["param"] == "prefix_tokens.0"
    assert "0..255" in native([[1, 2, 256]])["message"]
    assert "at most 255" in native([[0] * 256])["message"]
    assert native([[1], [2]])["param"] == "prefix_tokens"


def test_metrics_expose_ours_and_vllms(server):
    samples = server.metrics()
    names = {key.partition("{")[0] for key in samples}
    for name in ["llamagen_images_generated_total", "llamagen_request_latency_seconds_bucket",
                 "llamagen_image_latency_seconds_bucket",
                 "llamagen_time_to_first_preview_seconds_bucket",
                 "llamagen_decoder_batch_size_bucket", "llamagen_decoder_seconds_bucket",
                 "llamagen_queue_depth", "llamagen_images_per_second",
                 "llamagen_admission_rejections_total", "llamagen_requests_aborted_total",
                 "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"]:
        assert name in names, name
    assert metric(samples, "llamagen_images_generated_total", model="shapes") > 0
    assert metric(samples, "vllm:num_requests_running", model_name="shapes") == 0


def test_deploy_metric_names_are_exported(server):
    """The autoscaler, the adapter rules and the dashboard use metrics the server exports."""

    text = httpx.get(f"{server.url}/metrics").text
    exported = {line.split()[2] for line in text.splitlines()
                if line.startswith("# TYPE ")}
    missing = {name for name in deploy_metric_names()
               if name not in exported and name.removesuffix("_total") not in exported}
    assert not missing, missing


def test_load_benchmark_closed_and_open_loop(server, tmp_path):
    """`llamagen bench serve` against this server: every request counted, agreeing with the
    server's own counter; a wrong key shows up as errors; JSON and plots written."""
    import argparse

    from bench.serve import LoadSpec, add_arguments, main, run_load

    spec = LoadSpec(url=server.url, api_key=API_KEY, prompts=["0", "red circle"])
    closed = asyncio.run(run_load(spec, mode="closed", concurrency=3, requests=7,
                                  progress=False))
    assert closed["requests"] == 7 and closed["ok"] == 7 and closed["images"] == 7
    assert closed["server"]["requests_counted"] == 7
    assert closed["latency_s"]["p50"] > 0 and closed["images_per_s"] > 0
    opened = asyncio.run(run_load(LoadSpec(url=server.url, api_key=API_KEY, stream=True,
                                           partial_images=1), mode="open", rate=20.0,
                                  requests=5, duration_s=60, progress=False))
    assert opened["ok"] == 5 and opened["server"]["requests_counted"] == 5
    assert opened["first_partial_s"]["p50"] > 0
    wrong = asyncio.run(run_load(LoadSpec(url=server.url, api_key="wrong"), requests=3,
                                 progress=False))
    assert wrong["errors_by_status"] == {"401": 3} and wrong["ok"] == 0

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--url", server.url, "--api-key", API_KEY, "--sweep", "2",
                              "--requests", "2", "--warmup", "0", "--json-out",
                              str(tmp_path / "serve.json"), "--plots-dir",
                              str(tmp_path / "plots"), "--markdown-out",
                              str(tmp_path / "B.md")])
    result = main(args)
    assert [r["concurrency"] for r in result["runs"]] == [1, 2]
    assert json.loads((tmp_path / "serve.json").read_text())["runs"][1]["ok"] == 2
    for name in ("latency_cdf.png", "sweep.png"):
        assert Image.open(tmp_path / "plots" / name).size[0] > 100
    assert "HTTP server under load" in (tmp_path / "B.md").read_text()


# ---- the clients users already run (shared/docs/milestone3-facts.md §1, from their source) ----

def _image_as_read(payload: dict, reads: str) -> Image.Image:
    """The first image of a response, read the way the client reads it."""
    first = payload["data"][0]
    if reads == "url" or (reads == "url, then b64_json" and "url" in first):
        response = httpx.get(first["url"], headers=AUTH, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "image/")
        return Image.open(io.BytesIO(response.content))
    return decode_b64(first["b64_json"])[0]


PROMPT = "yellow star"
# client, its request as it sends it (fields, defaults, hard-coded values), how it reads the
# answer, the image side it expects.
CLIENT_REQUESTS = [
    ("LangChain DallEAPIWrapper", {"prompt": PROMPT, "n": 1, "size": "1024x1024",
                                   "model": "dall-e-2"}, "url", 1024),
    ("Open WebUI", {"model": "dall-e-2", "prompt": PROMPT, "n": 1, "size": "512x512",
                    "response_format": "b64_json"}, "url, then b64_json", 512),
    ("Open WebUI, a gpt-image model", {"model": "gpt-image-1", "prompt": PROMPT, "n": 1,
                                       "size": "1024x1024"}, "url, then b64_json", 1024),
    ("LibreChat", {"model": "gpt-image-1", "prompt": PROMPT, "n": 1, "background": "auto",
                   "output_format": "webp", "output_compression": 90, "quality": "auto",
                   "size": "auto", "response_format": "b64_json"}, "b64_json", 256),
    ("openai SDK defaults", {"model": "dall-e-2", "prompt": PROMPT}, "url", 256),
]
EDIT_REQUESTS = [
    ("Open WebUI edit", "image", {"model": "dall-e-2", "prompt": PROMPT, "n": "1",
                                  "size": "512x512", "background": "auto",
                                  "response_format": "b64_json"}, "url, then b64_json", 512),
    ("LibreChat edit", "image[]", {"model": "gpt-image-1", "prompt": PROMPT, "n": "1",
                                   "background": "auto", "output_format": "webp",
                                   "output_compression": "90", "quality": "auto",
                                   "size": "auto", "response_format": "b64_json"},
     "b64_json", 256),
]


@pytest.mark.parametrize("name,body,reads,side", CLIENT_REQUESTS,
                         ids=[row[0] for row in CLIENT_REQUESTS])
def test_what_real_clients_send_works(server, name, body, reads, side):
    response = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, json=body,
                          timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_openai(payload, openai.types.ImagesResponse)
    assert payload["size"] == f"{side}x{side}" and payload["native_size"] == "256x256"
    assert _image_as_read(payload, reads).size == (side, side)


@pytest.mark.parametrize("name,field,fields,reads,side", EDIT_REQUESTS,
                         ids=[row[0] for row in EDIT_REQUESTS])
def test_what_real_clients_send_as_edits_works(server, source_image, name, field, fields,
                                               reads, side):
    response = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60,
                          data=fields, files={field: ("in.png", source_image[0], "image/png")})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert_openai(payload, openai.types.ImagesResponse)
    assert _image_as_read(payload, reads).size == (side, side)


def test_served_model_names(client, server):
    """--served-model-name shapes dall-e-2 gpt-image-1: the first is reported, every one
    is accepted, metrics name the first."""
    assert [m.id for m in client.models.list().data
            if "parent" not in m.model_extra] == ["shapes"]
    before = metric(server.metrics(), "llamagen_images_generated_total", model="shapes")
    for name in ("dall-e-2", "gpt-image-1", "shapes"):
        assert len(client.images.generate(model=name, prompt="1", response_format="b64_json",
                                          extra_body={"seed": 1}).data) == 1
    after = metric(server.metrics(), "llamagen_images_generated_total", model="shapes")
    assert after == before + 3
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="1")


def test_resampled_sizes_say_so_in_provenance(client, served_model):
    """A square size other than the native one is a Lanczos resampling of the native image;
    the response, the file's record and its signed manifest say so."""
    native = client.images.generate(prompt="2", response_format="b64_json",
                                    extra_body={"seed": 9, "temperature": 0})
    large = client.images.generate(prompt="2", size="512x512", response_format="b64_json",
                                   extra_body={"seed": 9, "temperature": 0})
    assert large.size == "512x512" and large.model_extra["native_size"] == "256x256"
    image, data = decode_b64(large.data[0].b64_json)
    assert image.size == (512, 512)
    small = np.asarray(decode_b64(native.data[0].b64_json)[0])
    expected = np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.LANCZOS))
    assert_pixels_close(np.asarray(image), expected)
    record = read_metadata(data)
    assert record["resampled"] == {"native_size": "256x256", "size": "512x512",
                                   "filter": "lanczos"}
    state, manifest = read_credentials(data, "png")
    assert state == "Valid"
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert [a["action"] for a in actions] == ["c2pa.created", "c2pa.resized"]
    assert "256x256 to 512x512" in actions[1]["description"]
    assert "resampled" not in read_metadata(decode_b64(native.data[0].b64_json)[1])


def test_responses_and_events_match_openais_schema(server, source_image):
    """Every response and stream event validates as OpenAI's published shapes (the SDK's
    own types, strictly; no null; the fields the schema requires); usage counts the class
    token as the prompt's text token."""
    def post(path: str, **kwargs) -> httpx.Response:
        response = httpx.post(f"{server.url}{path}", headers=AUTH, timeout=60, **kwargs)
        assert response.status_code == 200, response.text
        return response

    types = openai.types
    for response_format in ("b64_json", "url", None):
        body = {"prompt": "1", "n": 2, "seed": 3}
        if response_format:
            body["response_format"] = response_format
        payload = post("/v1/images/generations", json=body).json()
        assert_openai(payload, types.ImagesResponse)
        usage = payload["usage"]
        assert usage["input_tokens_details"] == {"text_tokens": 2, "image_tokens": 0}
        assert usage["output_tokens"] == 2 * 256
        # Omitted: both fields, so that clients reading either work.
        fields = {"b64_json", "url"} if response_format is None else {response_format}
        assert all(fields <= set(image) for image in payload["data"])
    events = sse_payloads(post("/v1/images/generations", json={
        "prompt": "1", "stream": True, "partial_images": 2, "size": "128x128"}))
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    for event in events:
        kind = types.ImageGenPartialImageEvent if "partial" in event["type"] \
            else types.ImageGenCompletedEvent
        assert_openai(event, kind)
        assert event["size"] == "128x128" and decode_b64(event["b64_json"])[0].size == (128, 128)
    files = {"image": ("in.png", source_image[0], "image/png")}
    edit = post("/v1/images/edits", files=files, data={"prompt": "2", "keep_rows": "4"}).json()
    assert_openai(edit, types.ImagesResponse)
    assert edit["usage"]["input_tokens_details"] == {"text_tokens": 1, "image_tokens": 64}
    events = sse_payloads(post("/v1/images/edits", files=files, data={
        "prompt": "2", "stream": "true", "partial_images": "1"}))
    assert_openai(events[0], types.ImageEditPartialImageEvent)
    assert_openai(events[1], types.ImageEditCompletedEvent)
    variation = post("/v1/images/variations", files=files).json()
    assert_openai(variation, types.ImagesResponse)


def test_json_edit_with_a_data_url_equals_the_multipart_edit(server, source_image):
    """OpenAI's JSON edits (images by reference): a data: URL gives exactly the image the
    same multipart edit gives."""
    data = source_image[0]
    options = {"prompt": "blue square", "keep_rows": 6, "temperature": 0,
               "response_format": "b64_json"}
    as_json = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60,
                         json={**options, "images": [{"image_url": data_url(data)}]})
    as_form = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60,
                         files={"image": ("in.png", data, "image/png")},
                         data={k: str(v) for k, v in options.items()})
    assert as_json.status_code == 200, as_json.text
    a, b = (decode_b64(r.json()["data"][0]["b64_json"]) for r in (as_json, as_form))
    assert_pixels_close(np.asarray(a[0]), np.asarray(b[0]))
    assert read_metadata(a[1])["edit"] == read_metadata(b[1])["edit"]
    # A mask by reference as well.
    masked = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60, json={
        "prompt": "3", "images": [{"image_url": data_url(data)}],
        "mask": {"image_url": data_url(mask_from_row(256, 256, 160))}})
    assert masked.status_code == 200 and masked.json()["data"][0]["kept_rows"] == 10


class ImageHost:
    """An HTTP server on 127.0.0.2 (allowed by the server's --image-url-networks) serving
    an image, a redirect to it, a redirect to loopback (not allowed), an oversized and a
    slow answer."""

    def __init__(self, png: bytes, loopback_port: int):
        import http.server

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.paths.append(self.path)
                if self.path == "/star.png":
                    self._send(200, png)
                elif self.path == "/hop":
                    self._redirect("/star.png")
                elif self.path == "/to-loopback":  # an allowed host, a loopback address
                    self._redirect(f"http://localhost:{loopback_port}/v1/models")
                elif self.path == "/big.png":
                    self._send(200, b"\x89PNG" + b"\0" * 300_000)
                elif self.path == "/slow.png":
                    time.sleep(4)
                    self._send(200, png)
                else:
                    self._send(404, b"")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.paths: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_image_urls_are_fetched_only_where_allowed(server, source_image):
    """SSRF: an http(s) image URL is fetched only from an allowed host at an allowed
    address, and every redirect is checked again; oversized and slow fetches stop at their
    limits; file_id and several images are clear 400s. Nothing refused reaches the host."""
    port = int(server.url.rsplit(":", 1)[1])
    host = ImageHost(source_image[0], port)
    try:
        def edit(url: str | None = None, **body) -> httpx.Response:
            body.setdefault("images", [{"image_url": url}])
            return httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60,
                              json={"prompt": "1", "response_format": "b64_json", **body})

        fetched = edit(f"{host.url}/star.png")
        assert fetched.status_code == 200, fetched.text
        assert edit(f"{host.url}/hop").status_code == 200  # a redirect to an allowed URL
        refused = [
            (f"http://127.0.0.1:{port}/v1/models", "images.0.image_url", "not among the hosts"),
            (f"http://localhost:{port}/x.png", "images.0.image_url", "non-public address"),
            (f"{host.url}/to-loopback", "images.0.image_url", "non-public address"),
            (f"{host.url}/big.png", "images.0.image_url", "exceeds 200000 bytes"),
            (f"{host.url}/slow.png", "images.0.image_url", "within 2 s"),
            ("ftp://127.0.0.2/x.png", "images.0.image_url", "data: URL"),
            ("file:///etc/passwd", "images.0.image_url", "data: URL"),
            (host.url.replace("//", "//user:pw@") + "/star.png", "images.0.image_url",
             "credentials"),
            ("data:text/plain;base64,aGVsbG8=", "images.0.image_url", "not an image"),
            ("data:image/png;base64,%%%", "images.0.image_url", "not valid base64"),
        ]
        for url, param, words in refused:
            error = error_of(edit(url), 400)
            assert error["param"] == param and words in error["message"], (url, error)
        assert "/v1/models" not in " ".join(host.paths)
        error = error_of(edit(images=[{"file_id": "file-abc"}]), 400)
        assert error["param"] == "images.0.file_id" and "Files API" in error["message"]
        two = [{"image_url": data_url(source_image[0])}] * 2
        assert error_of(edit(images=two), 400)["param"] == "images"
        # Checked before anything is fetched: a bad field refuses the request at once.
        seen = len(host.paths)
        assert error_of(edit(f"{host.url}/star.png", n=11), 400)["param"] == "n"
        assert error_of(edit(f"{host.url}/star.png", prompt="zebra"), 400)["param"] == "prompt"
        assert error_of(edit(f"{host.url}/star.png", size="9x3"), 400)["param"] == "size"
        assert len(host.paths) == seen
    finally:
        host.close()


def test_variations_redraw_without_a_condition(client, served_model, source_image):
    """A variation keeps the top rows and redraws the rest under the null class, in both
    streams: greedy, exactly the reference loop's completion with the null class."""
    import torch

    from model_registry.generate import generate

    data, pixels = source_image
    result = client.images.create_variation(image=("in.png", data, "image/png"), n=2,
                                            response_format="b64_json",
                                            extra_body={"temperature": 0})
    assert len(result.data) == 2 and result.size == "256x256"
    assert result.usage.input_tokens_details.image_tokens == 2 * 128
    assert result.usage.input_tokens_details.text_tokens == 0
    prefix = input_codes(served_model, pixels)[: 8 * 16]
    null = served_model.gpt.null_class
    tokens = generate(served_model.load_reference(), torch.tensor([null]), cfg_scale=1.0,
                      greedy=True, prefix=torch.tensor([prefix]))
    decoder = served_model.vq_decoder(dtype=torch.float32)
    expected = decoder.decode_uint8(tokens.view(1, 16, 16)).numpy()[0]
    image, file = decode_b64(result.data[0].b64_json)
    assert_pixels_close(np.asarray(image), expected)
    assert result.data[0].model_extra["kept_rows"] == 8
    meta = read_metadata(file)
    assert meta["unconditional"] is True and meta["edit"]["variation"] is True
    assert meta["sampling"]["cfg_scale"] == 1.0 and "class_label" not in meta
    state, manifest = read_credentials(file, "png")
    assert state == "Valid"
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert "without a condition" in actions[1]["description"]
    wider = client.images.create_variation(image=("in.png", data, "image/png"), size="512x512",
                                           extra_body={"keep_rows": 2, "seed": 4})
    assert decode_b64(wider.data[0].b64_json)[0].size == (512, 512)
    assert wider.data[0].model_extra["kept_rows"] == 2
    for fields, param in [({"cfg_scale": "3"}, "cfg_scale"), ({"prompt": "1"}, "prompt"),
                          ({"keep_rows": "16"}, "keep_rows")]:
        response = httpx.post(f"{server_url(client)}/v1/images/variations", headers=AUTH,
                              timeout=30, data=fields,
                              files={"image": ("in.png", data, "image/png")})
        assert error_of(response, 400)["param"] == param


def server_url(client: openai.OpenAI) -> str:
    return str(client.base_url).rstrip("/").removesuffix("/v1")


def test_huge_numbers_get_our_message(server, source_image):
    """Integers Python will not convert (over 4300 digits) are refused in our words."""
    files = {"image": ("in.png", source_image[0], "image/png")}
    for fields, param in [({"prompt": "9" * 32000}, "prompt"), ({"seed": "9" * 5000}, "seed")]:
        response = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=30,
                              files=files, data={"prompt": "1", **fields})
        error = error_of(response, 400)
        assert error["param"] == param and "4300" not in error["message"], error
    response = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=30, json={
        "prompt": "9" * 32000, "images": [{"image_url": data_url(source_image[0])}]})
    error = error_of(response, 400)
    assert error["param"] == "prompt" and "out of range" in error["message"], error


def test_litellm_sdk_generates_and_edits(server, source_image, monkeypatch):
    """LiteLLM's SDK (pinned), as its users call it: openai/<name> with api_base."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    base = f"{server.url}/v1"
    made = litellm.image_generation(model="openai/dall-e-2", prompt=PROMPT, api_base=base,
                                    api_key=API_KEY, size="512x512")
    image = made.data[0]
    assert decode_b64(image.b64_json)[0].size == (512, 512) and image.url
    edited = litellm.image_edit(model="openai/gpt-image-1", prompt=PROMPT, api_base=base,
                                api_key=API_KEY,
                                image=io.BytesIO(source_image[0]))
    assert decode_b64(edited.data[0].b64_json)[0].size == (256, 256)


def test_negative_prompts_are_token_exact_and_recorded(client, server, served_model):
    """A negative class in the unguided stream: one per image (native) or one for all
    (OpenAI), greedy tokens equal to the reference loop's with the negative in its
    unconditional half, recorded in the provenance; absent, nothing changes."""
    from engine.sampling import SamplingOptions

    from .helpers import reference_tokens

    options = SamplingOptions(cfg_scale=4.0, greedy=True)
    response = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120, json={
        "labels": ["yellow star", 3, 5], "negative_prompts": ["blue square", "0", "blue square"],
        "cfg_scale": 4.0, "greedy": True, "return_tokens": True})
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    for image, label, negative in zip(images, [3, 3, 5], [1, 0, 1], strict=True):
        assert image["tokens"] == reference_tokens(served_model, [label], options,
                                                   negative=[negative])[0]
        assert image["negative_prompt"] == NAMES[negative]
    assert images[0]["tokens"] != reference_tokens(served_model, [3], options)[0]
    result = client.images.generate(model="shapes", prompt="yellow star", n=1, extra_body={
        "negative_prompt": "blue square", "temperature": 0, "cfg_scale": 4.0})
    meta = read_metadata(decode_b64(result.data[0].b64_json)[1])
    assert meta["negative"] == {"label": 1, "class_name": "blue square"}
    assert meta["class_label"] == 3
    plain = client.images.generate(model="shapes", prompt="yellow star", n=1,
                                   extra_body={"temperature": 0, "cfg_scale": 4.0})
    assert "negative" not in read_metadata(decode_b64(plain.data[0].b64_json)[1])


@pytest.mark.parametrize("path,body,param,code", [
    ("/v1/images/generations", {"prompt": "1", "negative_prompt": "2", "cfg_scale": 1.0},
     "negative_prompt", "negative_without_guidance"),
    ("/v1/images/generations", {"prompt": "1", "negative_prompt": "zebra"},
     "negative_prompt", "unknown_class"),
    ("/v1/images/generations", {"prompt": "1", "negative_prompt": " "}, "negative_prompt",
     None),
    ("/v1/generate", {"labels": [1, 2], "negative_prompts": [3]}, "negative_prompts",
     "invalid_value"),
    ("/v1/generate", {"labels": [1, 2], "negative_prompts": [3, "zebra"]},
     "negative_prompts.1", "unknown_class"),
    ("/v1/generate", {"labels": [1], "negative_prompt": 3, "negative_prompts": [3]}, None,
     None),
    ("/v1/generate", {"labels": [1], "negative_prompt": 99}, "negative_prompt",
     "unknown_class"),
    ("/v1/generate", {"labels": [1], "priority": 101}, "priority", None),
    ("/v1/images/generations", {"prompt": "1", "priority": -101}, "priority", None),
])
def test_bad_negatives_and_priorities_are_clear_400s(server, path, body, param, code):
    before = metric(server.metrics(), "llamagen_queue_depth")
    error = error_of(httpx.post(f"{server.url}{path}", headers=AUTH, json=body, timeout=60),
                     400)
    assert param is None or error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert metric(server.metrics(), "llamagen_queue_depth") == before  # nothing admitted


def test_a_full_queue_refuses_less_urgent_work_first(server):
    """Under the priority policy a quarter of the queue (3 of 12 images) is kept for work of
    priority <= 0: with 9 low-priority images in flight another low one gets a 429, an
    urgent one still fits."""
    client, response, lines = _open_stream(server, 9, priority=5)
    try:
        refused = httpx.post(f"{server.url}/v1/generate", headers=AUTH,
                             json={"labels": [1], "priority": 5})
        assert error_of(refused, 429)["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        ok = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120,
                        json={"labels": [1, 2, 3], "priority": -5})
        assert ok.status_code == 200, ok.text
    finally:
        for _ in lines:
            pass
        response.close()
        client.close()


def test_api_keys_have_tiers_limits_and_usage(server):
    """Keys from the file: priorities bounded by the key, images per minute and in flight
    limited (429 with Retry-After, counted per key), usage per key in the metrics and in
    the access log under the key's name; no key is ever logged."""
    bulk = {"Authorization": f"Bearer {BULK_KEY}"}
    web = {"Authorization": f"Bearer {WEB_KEY}"}
    url = f"{server.url}/v1/images/generations"
    before = server.metrics()
    # Its max_priority is 5: it may not ask for 0.
    assert error_of(httpx.post(url, headers=bulk, json={"prompt": "1", "priority": 0}),
                    400)["code"] == "priority_not_allowed"
    # More than its in-flight limit in one request can never pass: a 400, not a 429.
    assert error_of(httpx.post(url, headers=bulk, json={"prompt": "1", "n": 4}),
                    400)["param"] == "n"
    ok = httpx.post(url, headers=bulk, timeout=120, json={"prompt": "1", "n": 3})
    assert ok.status_code == 200, ok.text
    refused = httpx.post(url, headers=bulk, json={"prompt": "1", "n": 2})  # 3 + 2 > 4 / min
    error = error_of(refused, 429)
    assert error["type"] == "rate_limit_error" and error["code"] == "key_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert httpx.post(url, headers=web, timeout=120, json={"prompt": "2"}).status_code == 200
    assert error_of(httpx.post(url, headers={"Authorization": "Bearer sk-nobody"},
                               json={"prompt": "1"}), 401)["code"] == "invalid_api_key"
    after = server.metrics()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("llamagen_key_images_total", key="bulk") == 3
    assert grew("llamagen_key_image_tokens_total", key="bulk") == 3 * 256
    assert grew("llamagen_key_images_total", key="web") == 1
    assert grew("llamagen_key_requests_total", key="bulk", outcome="ok") == 1
    assert grew("llamagen_key_requests_total", key="bulk", outcome="rejected") == 2
    assert grew("llamagen_key_rejections_total", key="bulk", limit="images_per_minute") == 1
    log = server.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("key") == "bulk" and line["status"] == 200]
    assert served and served[-1]["images"] == 3 and served[-1]["image_tokens"] == 3 * 256
    for secret in (BULK_KEY, WEB_KEY, API_KEY):
        assert secret not in log


def test_keys_file_is_reloaded_on_sighup(server, keys_file):
    late = {"Authorization": f"Bearer {LATE_KEY}"}
    url = f"{server.url}/v1/models"
    assert httpx.get(url, headers=late).status_code == 401
    with keys_file.open("a") as f:
        f.write(json.dumps({"name": "late", "key": LATE_KEY}) + "\n")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while httpx.get(url, headers=late).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not loaded"
        time.sleep(0.2)
    # A file that no longer parses keeps the keys in force.
    keys_file.write_text("{not json\n")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "keys file not reloaded" not in server.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(url, headers=late).status_code == 200
    assert httpx.get(url, headers=AUTH).status_code == 200


def test_lora_adapters_are_listed_served_and_recorded(client, server, served_model,
                                                     served_adapters):
    """An adapter from --lora-modules: in /v1/models with its parent, picked by `model` in
    the OpenAI and native routes, token-exact against peft's merged reference, recorded in
    the provenance (name and the sha256 of its weights), counted per adapter."""
    from engine.sampling import SamplingOptions
    from model_registry.lora import ADAPTER_WEIGHTS, file_sha256

    from .helpers import reference_tokens

    cards = {card.id: card for card in client.models.list().data}
    assert cards["style-a"].model_extra["parent"] == "shapes"
    assert "parent" not in cards["shapes"].model_extra
    before = server.metrics()
    response = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120, json={
        "model": "style-a", "labels": [3, 7], "greedy": True, "cfg_scale": 4.0,
        "return_tokens": True})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "style-a"
    options = SamplingOptions(cfg_scale=4.0, greedy=True)
    path = served_adapters["style-a"]
    for image, label in zip(response.json()["images"], [3, 7], strict=True):
        assert image["tokens"] == reference_tokens(served_model, [label], options,
                                                   adapter=path)[0]
        assert image["tokens"] != reference_tokens(served_model, [label], options)[0]
    result = client.images.generate(model="style-a", prompt="yellow star", n=1)
    meta = read_metadata(decode_b64(result.data[0].b64_json)[1])
    assert meta["lora"]["name"] == "style-a"
    assert meta["lora"]["sha256"] == file_sha256(path / ADAPTER_WEIGHTS)
    after = server.metrics()
    assert metric(after, "llamagen_adapter_images_total", adapter="style-a") - metric(
        before, "llamagen_adapter_images_total", adapter="style-a") == 3
    assert metric(after, "llamagen_adapter_requests_total", adapter="style-a",
                  outcome="ok") - metric(before, "llamagen_adapter_requests_total",
                                         adapter="style-a", outcome="ok") == 2
    assert any(name.startswith("vllm:lora_requests_info") for name in after)
    error = error_of(httpx.post(f"{server.url}/v1/generate", headers=AUTH,
                                json={"model": "style-z", "labels": [1]}), 404)
    assert error["code"] == "model_not_found" and "style-a" in error["message"]


def test_adapters_load_and_unload_at_run_time(server, served_model, served_adapters, tmp_path):
    """vLLM's runtime routes: an admin key loads and unloads; a bad adapter is a 400 and
    nothing is loaded; another key gets a 403."""
    from engine.sampling import SamplingOptions

    from .helpers import reference_tokens

    load, unload = f"{server.url}/v1/load_lora_adapter", f"{server.url}/v1/unload_lora_adapter"
    bulk = {"Authorization": f"Bearer {BULK_KEY}"}
    body = {"lora_name": "style-b", "lora_path": str(served_adapters["style-b"])}
    assert error_of(httpx.post(load, headers=bulk, json=body), 403)["code"] == \
        "permission_denied"
    for bad, pattern in [({"lora_path": str(served_adapters["too-big"])}, "rank 16 exceeds"),
                         ({"lora_path": str(tmp_path / "missing")}, "no such adapter"),
                         ({"lora_path": str(tmp_path)}, "not a PEFT adapter")]:
        error = error_of(httpx.post(load, headers=AUTH, json={**body, **bad}), 400)
        assert error["code"] == "invalid_adapter" and pattern in error["message"], error
    assert error_of(httpx.post(load, headers=AUTH, json={**body, "lora_name": "shapes"}),
                    400)["param"] == "lora_name"
    assert error_of(httpx.post(load, headers=AUTH, json={**body, "base_model_name": "cats"}),
                    404)["param"] == "base_model_name"
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert "style-b" not in models
    loaded = httpx.post(load, headers=AUTH, json=body, timeout=60)
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    response = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120, json={
        "model": "style-b", "labels": [5], "greedy": True, "return_tokens": True})
    assert response.json()["images"][0]["tokens"] == reference_tokens(
        served_model, [5], SamplingOptions(cfg_scale=4.0, greedy=True),
        adapter=served_adapters["style-b"])[0]
    removed = httpx.post(unload, headers=AUTH, json={"lora_name": "style-b"}, timeout=60)
    assert removed.status_code == 200 and "removed successfully" in removed.text
    assert error_of(httpx.post(f"{server.url}/v1/generate", headers=AUTH,
                               json={"model": "style-b", "labels": [5]}), 404)
    assert error_of(httpx.post(unload, headers=AUTH, json={"lora_name": "style-b"}),
                    404)["code"] == "adapter_not_found"


def test_sigterm_drains_in_flight_work(server):
    """Last: stops the module's server. In-flight work finishes; new work is refused."""
    result: dict = {}

    def long_request() -> None:
        result["response"] = httpx.post(f"{server.url}/v1/generate", headers=AUTH, timeout=120,
                                        json={"labels": [1] * 8, "seed": 3})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 30
    while metric(server.metrics(), "llamagen_queue_depth") < 8:
        assert time.monotonic() < deadline, "request never started"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["images"]) == 8
    # uvicorn re-raises the signal once shut down cleanly, so the exit status is SIGTERM's.
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/ready", timeout=2)
