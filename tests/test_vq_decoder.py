"""The VQ decoder: golden pixels, strict loading, round trip, batching, dtypes, previews,
image files with provenance, and the CLI's --out-dir."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine.decoding import DecoderService, stack_batch
from model_registry.checkpoint import CheckpointError, read_checkpoint, strict_state_dict
from model_registry.synthetic import random_vq_state_dict, save_vq_checkpoint
from vq_decoder.decoder import to_uint8
from vq_decoder.encoding import (
    DIGITAL_SOURCE_TYPE,
    IMAGE_FORMATS,
    encode_image,
    provenance,
    read_metadata,
)
from vq_decoder.vq_model import VQ_MODELS, VQModel

from .helpers import TINY_VQ, assert_pixels_close, read_credentials, run_cli


def golden_codes(golden_expected) -> torch.Tensor:
    return torch.tensor(golden_expected["settings"][0]["tokens"]).view(4, 16, 16)


@pytest.fixture(scope="module")
def golden_decoder(golden_model):
    return golden_model.vq_decoder(device="cpu", dtype=torch.float32)


def test_golden_pixels(golden, golden_expected, golden_decoder):
    pixels = golden_decoder.decode_uint8(golden_codes(golden_expected)).numpy()
    assert pixels.shape == (4, 256, 256, 3) and pixels.dtype == np.uint8
    assert_pixels_close(pixels, np.load(golden / "c2i_pixels.npy"))


@pytest.mark.parametrize("name,keys", [("VQ-16", 344), ("VQ-8", 300)])
def test_official_vq_shapes_load_strictly(tmp_path, name, keys):
    cfg = VQ_MODELS[name]
    path = save_vq_checkpoint(cfg, tmp_path / "vq.pt", seed=0)
    sd, layout = read_checkpoint(path)
    assert layout == "model" and len(sd) == keys
    with torch.device("meta"):
        shapes = VQModel(cfg)
    assert len(strict_state_dict(sd, shapes, name)) == keys
    other = VQ_MODELS["VQ-8" if name == "VQ-16" else "VQ-16"]
    with torch.device("meta"):
        wrong = VQModel(other)
    with pytest.raises(CheckpointError, match=f"{name} does not match its config"):
        strict_state_dict(sd, wrong, name)


def test_vq_mismatch_in_convert_is_a_clear_error(tmp_path, golden):
    from model_registry.convert import convert

    # The golden VQ file read with a config of another width.
    wrong = dataclasses.replace(TINY_VQ, codebook_size=512, ch=64)
    with pytest.raises(CheckpointError, match=r"VQ checkpoint .*shape mismatch"):
        convert(golden / "c2i_gpt.pt", str(golden / "c2i_gpt.json"), tmp_path / "m",
                vq_checkpoint=golden / "vq.pt", vq_model=json.dumps(wrong.to_dict()))
    assert not (tmp_path / "m").exists()


def test_encode_quantize_decode_round_trip():
    torch.manual_seed(0)
    model = VQModel(TINY_VQ).eval()
    model.load_state_dict(random_vq_state_dict(TINY_VQ, seed=4))
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        q = model.encode(image)
        ids = q.indices.view(2, 4, 4)
        # Quantizing the looked-up codebook vectors returns the same ids ...
        z_q = model.quantize.get_codebook_entry(ids.view(2, 16), (2, 8, 4, 4))
        assert torch.equal(model.quantize(z_q).indices.view(2, 4, 4), ids)
        # ... and decode_code decodes exactly what decode(z_q) does.
        assert torch.equal(model.decode_code(ids.view(2, 16), (2, 8, 4, 4)), model.decode(z_q))
        assert model.decode(z_q).shape == (2, 3, 64, 64)


def test_uint8_rounding_rule():
    # 127.5 (x + 1) -> round half up, clamped: the original sampler's truncation of +128.
    values = torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0, 10.5 / 127.5 - 1, 10.49 / 127.5 - 1,
                           254.5 / 127.5 - 1])
    out = to_uint8(values.view(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 11, 10, 255]


def test_partial_grid_preview_is_the_top_of_the_picture(golden_expected, golden_decoder):
    codes = golden_codes(golden_expected)
    preview = golden_decoder.decode_uint8(codes[:1, :5])
    assert preview.shape == (1, 80, 256, 3)


def test_bf16_decode_close_to_fp32(golden_model, golden_expected, golden_decoder):
    codes = golden_codes(golden_expected)
    fp32 = golden_decoder.decode_uint8(codes).numpy().astype(int)
    bf16 = golden_model.vq_decoder(device="cpu", dtype=torch.bfloat16).decode_uint8(codes)
    diff = np.abs(bf16.numpy().astype(int) - fp32)
    # Stated tolerance (random weights, outputs up to |3.4|): mean <= 3 levels, p99 <= 16.
    assert diff.mean() <= 3 and np.percentile(diff, 99) <= 16, (diff.mean(),
                                                                np.percentile(diff, 99))


def test_service_micro_batches_and_matches_one_by_one(golden_expected, golden_decoder):
    codes = golden_codes(golden_expected)
    batches: list[int] = []

    async def run() -> list[np.ndarray]:
        service = DecoderService(golden_decoder, max_batch_size=3, max_wait_s=0.05,
                                 on_batch=lambda n, _s: batches.append(n))
        await service.start()
        try:
            full = [service.decode(codes[i].flatten(), 16) for i in range(4)]
            previews = [service.decode(codes[i, :5].flatten(), 16) for i in range(4)]
            return await asyncio.gather(*full, *previews)
        finally:
            await service.stop()

    results = asyncio.run(run())
    assert sorted(batches) == [1, 1, 3, 3]  # two shapes, never mixed, batches of <= 3
    for i in range(4):
        one = golden_decoder.decode_uint8(codes[i: i + 1]).numpy()[0]
        assert_pixels_close(results[i], one)
        assert results[4 + i].shape == (80, 256, 3)
        assert_pixels_close(results[4 + i],
                            golden_decoder.decode_uint8(codes[i: i + 1, :5]).numpy()[0])


def test_previews_use_their_decoder_and_wait_behind_final_grids(golden_expected,
                                                               golden_decoder):
    """Previews decode by the preview decoder; of the work waiting, final grids go first
    (whatever arrived earlier), and the previews then batch together."""
    codes = golden_codes(golden_expected)
    order: list[str] = []
    running = threading.Event()  # the first batch holds the worker until the rest wait

    class Recording:
        device = golden_decoder.device

        def __init__(self, name: str):
            self.name = name

        def decode_uint8(self, batch: torch.Tensor) -> torch.Tensor:
            order.append(f"{self.name}x{len(batch)}")
            running.wait(timeout=30)
            return golden_decoder.decode_uint8(batch)

    async def run() -> list[np.ndarray]:
        service = DecoderService(Recording("final"), preview_decoder=Recording("preview"),
                                 max_batch_size=4, max_wait_s=0.01)
        await service.start()
        try:
            first = asyncio.ensure_future(service.decode(codes[0].flatten(), 16))
            while not order:
                await asyncio.sleep(0.01)
            later = [asyncio.ensure_future(service.decode(codes[i].flatten(), 16,
                                                          preview=True)) for i in (1, 2)]
            later.append(asyncio.ensure_future(service.decode(codes[3].flatten(), 16)))
            await asyncio.sleep(0.1)  # all three wait, the previews longest
            running.set()
            return await asyncio.gather(first, *later)
        finally:
            await service.stop()

    results = asyncio.run(run())
    assert order == ["finalx1", "finalx1", "previewx2"]
    for i, pixels in enumerate(results):
        assert_pixels_close(pixels, golden_decoder.decode_uint8(codes[i: i + 1]).numpy()[0])


def test_invariant_batches_decode_a_grid_the_same_whatever_else_is_in_flight(
        golden_expected, golden_decoder):
    """Padded to a fixed batch, a grid gives the same pixels alone, at another position,
    beside other grids, and as one of a partly filled batch."""
    codes = golden_codes(golden_expected)
    batches: list[int] = []

    async def run() -> list[np.ndarray]:
        service = DecoderService(golden_decoder, max_batch_size=4, max_wait_s=0.05,
                                 invariant=True, on_batch=lambda n, _s: batches.append(n))
        await service.start()
        try:
            alone = await service.decode(codes[0].flatten(), 16)
            crowd = await asyncio.gather(*(service.decode(codes[i].flatten(), 16)
                                           for i in (2, 1, 0)))
            return [alone, crowd[2]]
        finally:
            await service.stop()

    alone, beside_others = asyncio.run(run())
    assert batches == [1, 3]
    assert np.array_equal(alone, beside_others)
    free = golden_decoder.decode_uint8(codes[:3]).numpy()[0]  # an unpadded batch of 3
    padded = golden_decoder.decode_uint8(torch.stack([codes[0]] * 4)).numpy()[0]
    assert np.array_equal(alone, padded)
    assert_pixels_close(alone, free)  # what free batching gives: close, not always equal


def test_service_rejects_ragged_rows(golden_decoder):
    async def run() -> None:
        service = DecoderService(golden_decoder)
        await service.start()
        try:
            await service.decode(list(range(20)), 16)
        finally:
            await service.stop()

    with pytest.raises(ValueError, match="whole rows"):
        asyncio.run(run())


@pytest.mark.parametrize("fmt", list(IMAGE_FORMATS))
def test_provenance_round_trip(fmt):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    record = provenance(model="demo", checkpoint_sha256="ab" * 32, seed=7,
                        sampling={"cfg_scale": 4.0, "top_k": 2000}, software="llamagen-serve x",
                        label=3, class_name="red circle")
    data = encode_image(pixels, fmt, metadata=record, compression=10)
    image = Image.open(io.BytesIO(data))
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert image.size == (48, 32)
    back = read_metadata(data)
    assert back == {**record, "xmp_digital_source_type": DIGITAL_SOURCE_TYPE}
    if fmt == "png":
        assert np.array_equal(np.asarray(image), pixels)


def test_generate_out_dir_images_are_the_decoded_tokens(tmp_path, tiny_model):
    out, tokens_file = tmp_path / "images", tmp_path / "tokens.json"
    result = run_cli("generate", "--model", str(tiny_model.path), "--labels", "3", "8", "3",
                     "--cfg-scale", "2.0", "--seed", "11", "--top-k", "50", "--dtype",
                     "float32", "--tokens-out", str(tokens_file), "--out-dir", str(out),
                     "--c2pa-dir", str(tmp_path / "c2pa"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000_3.png", "0001_8.png", "0002_3.png"]
    tokens = torch.tensor(json.loads(tokens_file.read_text())).view(3, 16, 16)
    decoder = tiny_model.vq_decoder(device="cpu", dtype=torch.float32)
    for i, name in enumerate(["0000_3.png", "0001_8.png", "0002_3.png"]):
        data = (out / name).read_bytes()
        # Offline decoding pads every batch to 32 grids, so each image is its grid decoded
        # without the other two (what `llamagen sample` relies on to match `generate`).
        alone = decoder.decode_uint8(stack_batch([tokens[i]], 32))[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), alone.numpy())
        meta = read_metadata(data)
        assert meta["seed"] == 11 + i and meta["class_label"] == [3, 8, 3][i]
        assert meta["checkpoint_sha256"] == tiny_model.gpt_sha256
        state, manifest = read_credentials(data, "png")  # signed, as every served image
        assert state == "Valid" and manifest["title"] == "image.png"
