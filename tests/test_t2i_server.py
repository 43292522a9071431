"""Serving a t2i model: text prompts through the OpenAI and native APIs, tokens equal to the
reference's for the same captions, the original's truncation, and clear errors."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
import torch
from PIL import Image

from model_registry.text_encoder import T5_MAX_LENGTH, clean_caption, left_pad
from vq_decoder.encoding import read_metadata

from .helpers import API_KEY, TINY_T2I, ServerProcess, metric, reference_t2i_tokens

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = " ".join(["a photo of two dogs running on the beach at night"] * 20)


@pytest.fixture(scope="module")
def t2i_model(t2i_served_model):
    return t2i_served_model


@pytest.fixture(scope="module")
def server(t2i_model, tmp_path_factory):
    with ServerProcess([t2i_model.path], tmp_path_factory.mktemp("server"),
                       "--max-num-seqs", "4") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def native(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generate", json=body, headers=AUTH, timeout=120)


def test_models_say_the_task(client):
    (card,) = client.models.list().data
    assert card.model_extra["task"] == "t2i" and card.model_extra["num_classes"] == 0


def test_native_prompts_give_the_reference_t2i_tokens(server, t2i_model):
    prompts = ["a red cat", "cat", LONG]
    response = native(server, {"prompts": prompts, "greedy": True, "cfg_scale": 7.5,
                                "return_tokens": True})
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [img["prompt"] for img in images] == [clean_caption(p) for p in prompts]
    assert all(img["class_label"] is None for img in images)
    valid = [c.features for c in t2i_model.load_text_encoder().encode(prompts)]
    assert [img["tokens"] for img in images] == reference_t2i_tokens(t2i_model, valid, 7.5)


def test_negative_captions_give_the_reference_tokens(client, server, t2i_model):
    """Negative captions, cleaned and tokenised as prompts, in the unguided stream: one per
    prompt (native, mixing shorter and longer than the prompt), one for all (an OpenAI edit),
    token-exact against the reference; usage counts their tokens; provenance records them."""
    import numpy as np

    prompts, negatives = ["a red cat", "cat", "a red cat"], ["a <b>Blurry</b> photo", LONG,
                                                             "a red cat"]
    response = native(server, {"prompts": prompts, "negative_prompts": negatives,
                               "greedy": True, "cfg_scale": 7.5, "return_tokens": True})
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [img["negative_prompt"] for img in images] == [clean_caption(n) for n in negatives]
    encoder = t2i_model.load_text_encoder()
    valid = [c.features for c in encoder.encode(prompts)]
    negative = [c.features for c in encoder.encode(negatives)]
    assert [img["tokens"] for img in images] == reference_t2i_tokens(
        t2i_model, valid, 7.5, negative=negative)
    # A negative equal to the prompt cancels guidance: the conditional stream's tokens.
    assert images[2]["tokens"] == reference_t2i_tokens(t2i_model, valid[2:], 1.0)[0]
    pixels = np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    result = client.images.edit(model="captions", image=("in.png", buf.getvalue()),
                                prompt="a red boat", extra_body={
                                    "keep_rows": 3, "temperature": 0,
                                    "negative_prompt": "A <i>Dark</i> sea"})
    meta = read_metadata(base64.b64decode(result.data[0].b64_json))
    assert meta["negative"] == {"prompt": "a dark sea"}
    tokens = [len(c.token_ids) for c in encoder.encode(["a red boat", "a dark sea"])]
    assert result.usage.input_tokens_details.text_tokens == sum(tokens)
    codes = t2i_model.vq_encoder(device="cpu").encode_uint8(torch.from_numpy(pixels)[None])
    prefix = codes[0].flatten()[:24].tolist()
    again = native(server, {"prompts": ["a red boat"], "negative_prompt": "A <i>Dark</i> sea",
                            "prefix_tokens": [prefix], "greedy": True, "return_tokens": True})
    boat, dark = ([c.features] for c in encoder.encode(["a red boat", "a dark sea"]))
    assert [again.json()["images"][0]["tokens"]] == reference_t2i_tokens(
        t2i_model, boat, 7.5, prefix=[prefix], negative=dark)


def test_openai_client_text_prompt(client, t2i_model):
    result = client.images.generate(model="captions", prompt="A <b>Blue</b> house by the sea",
                                    n=2, extra_body={"seed": 7, "cfg_scale": 4.0})
    assert len(result.data) == 2 and result.size == "128x128"
    tokens = len(t2i_model.load_text_encoder().encode(["a blue house by the sea"])[0].token_ids)
    assert result.usage.input_tokens == 2 * tokens
    assert result.usage.input_tokens_details.text_tokens == 2 * tokens
    for img in result.data:
        assert img.revised_prompt == "a blue house by the sea"
        data = base64.b64decode(img.b64_json)
        assert Image.open(io.BytesIO(data)).size == (128, 128)
        meta = read_metadata(data)
        assert meta["prompt"] == "a blue house by the sea" and "class_label" not in meta
        assert meta["sampling"]["cfg_scale"] == 4.0 and meta["sampling"]["top_k"] == 1000


def test_edit_completes_the_image_under_a_caption(client, server, t2i_model):
    """t2i edit through the openai client: greedy, it equals the native completion from the
    input's codes, whose tokens equal the reference's completion for the caption."""
    import numpy as np

    pixels = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    result = client.images.edit(model="captions", image=("in.png", buf.getvalue()),
                                prompt="a red boat", extra_body={"keep_rows": 3,
                                                                 "temperature": 0})
    assert result.data[0].model_extra["kept_rows"] == 3
    assert result.data[0].revised_prompt == "a red boat"
    # Encoded alone, as the server does on a CPU (decode and encode batches of 1).
    codes = t2i_model.vq_encoder(device="cpu").encode_uint8(torch.from_numpy(pixels)[None])
    prefix = codes[0].flatten()[:24].tolist()
    response = native(server, {"prompts": ["a red boat"], "prefix_tokens": [prefix],
                               "greedy": True, "return_tokens": True})
    image = response.json()["images"][0]
    valid = [c.features for c in t2i_model.load_text_encoder().encode(["a red boat"])]
    assert [image["tokens"]] == reference_t2i_tokens(t2i_model, valid, 7.5, prefix=[prefix])
    edited = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    native_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))))
    assert np.abs(edited.astype(int) - native_pixels).max() <= 1


def test_variation_redraws_under_the_null_caption(server, t2i_model):
    """A t2i variation: greedy, the reference's completion under the learned null caption
    (all 120 rows) in both streams, unguided; a JSON edit by data: URL works here too."""
    import numpy as np

    pixels = np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    response = httpx.post(f"{server.url}/v1/images/variations", headers=AUTH, timeout=120,
                          files={"image": ("in.png", buf.getvalue(), "image/png")},
                          data={"keep_rows": "3", "temperature": "0",
                                "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    (image,) = response.json()["data"]
    assert image["kept_rows"] == 3 and "revised_prompt" not in image
    codes = t2i_model.vq_encoder(device="cpu").encode_uint8(torch.from_numpy(pixels)[None])
    prefix = codes[0].flatten()[:24].tolist()
    tokens = reference_t2i_tokens(t2i_model, [t2i_model.null_caption()], 1.0, prefix=[prefix])
    expected = t2i_model.vq_decoder(dtype=torch.float32).decode_uint8(
        torch.tensor(tokens).view(1, 8, 8)).numpy()[0]
    varied = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))))
    assert np.abs(varied.astype(int) - expected).max() <= 1
    assert read_metadata(base64.b64decode(image["b64_json"]))["unconditional"] is True
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    edit = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=120, json={
        "prompt": "a red boat", "images": [{"image_url": url}], "keep_rows": 3})
    assert edit.status_code == 200 and edit.json()["data"][0]["revised_prompt"] == "a red boat"


def test_over_long_prompt_is_truncated_to_120_tokens(client):
    result = client.images.generate(model="captions", prompt=LONG, n=1,
                                    extra_body={"temperature": 0})
    assert result.usage.input_tokens == T5_MAX_LENGTH


def test_streaming_partial_images(server):
    with httpx.stream("POST", f"{server.url}/v1/images/generations", headers=AUTH, timeout=120,
                      json={"prompt": "a green tree", "stream": True, "partial_images": 2}
                      ) as response:
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines()
                  if line.startswith("data:")]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert events[-1]["revised_prompt"] == "a green tree"
    # Nothing said about sampling: sample_t2i.py's defaults, not the c2i demo's.
    sampling = read_metadata(base64.b64decode(events[-1]["b64_json"]))["sampling"]
    assert sampling["cfg_scale"] == 7.5 and sampling["top_k"] == 1000


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
])
def test_empty_prompt_is_a_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="captions", **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param


@pytest.mark.parametrize("body,code", [
    ({"prompts": ["a cat", " "]}, "invalid_value"),
    ({"labels": [1]}, "wrong_task"),
    ({"labels": [1], "prompts": ["a cat"]}, "invalid_value"),
    ({"prompts": []}, "invalid_value"),
])
def test_native_bad_prompts(server, body, code):
    response = native(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code


def test_text_encoder_metrics(server):
    samples = server.metrics()
    assert metric(samples, "llamagen_text_encoder_batch_size_count") >= 1
    assert metric(samples, "llamagen_text_encoder_seconds_count") >= 1


def test_caption_features_match_the_reference_encoder(t2i_model):
    """What the server projects is what the original would: the same T5 rows, padded to 120."""
    captions = t2i_model.load_text_encoder().encode(["a cat", LONG])
    features, masks = left_pad([c.features for c in captions])
    assert masks.sum(1).tolist() == [3, T5_MAX_LENGTH]
    assert torch.equal(features[0, :-3], torch.zeros(T5_MAX_LENGTH - 3, TINY_T2I["caption_dim"]))
