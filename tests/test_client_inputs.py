"""What clients send that needs no engine to check: served model names, which image URLs
may be fetched (SSRF), data: URLs, resampled sizes. The HTTP behaviour is in test_server."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import numpy as np
import pytest

from server.fetch import DataUrl, FetchPolicy, FetchRefused
from server.serving import output_side
from server.settings import ServerSettings
from vq_decoder.encoding import resample

from .helpers import assert_one_line_error, run_cli


def names(entries: list[str], models: list[str]) -> dict[str, list[str]]:
    return ServerSettings(served_model_name=entries).served_names(models)


def test_served_model_names_follow_vllms_flag():
    assert names([], ["demo"]) == {"demo": ["demo"]}
    assert names(["dall-e-2", "gpt-image-1"], ["demo"]) == {"demo": ["dall-e-2", "gpt-image-1"]}
    # Several models: MODEL=NAME; a model named by none keeps its own name.
    assert names(["a=dall-e-2", "a=gpt-image-1"], ["a", "b"]) == {
        "a": ["dall-e-2", "gpt-image-1"], "b": ["b"]}
    for entries, models, words in [
            (["dall-e-2"], ["a", "b"], "MODEL=NAME"),
            (["c=x"], ["a", "b"], "no served model is named 'c'"),
            (["a=x", "b=x"], ["a", "b"], "names two models"),
            (["a="], ["a", "b"], "empty"),
            (["b"], ["a", "b"], "MODEL=NAME")]:
        with pytest.raises(ValueError, match=words):
            names(entries, models)


def test_a_bad_served_model_name_stops_serve_before_any_engine_starts():
    result = run_cli("serve", "--served-model-name", "nope=x", "--port", "1", timeout=120)
    assert_one_line_error(result, "no served model is named 'nope'")


POLICY = FetchPolicy.from_settings(["images.example.com", "*.cdn.example.org"],
                                   ["10.1.0.0/16"], 5)


@pytest.mark.parametrize("url,words", [
    ("http://images.example.com/a.png", None),
    ("https://x.cdn.example.org/a.png", None),
    ("https://cdn.example.org/a.png", "not among the hosts"),  # *. matches subdomains only
    ("http://evil.com/a.png", "not among the hosts"),
    ("http://images.example.com.evil.com/a.png", "not among the hosts"),
    ("http://user@images.example.com/a.png", "credentials"),
    ("http://images.example.com:99999/a.png", "not a valid URL"),
    ("gopher://images.example.com/", "data: URL"),
    ("//images.example.com/a.png", "data: URL"),
])
def test_only_allowed_hosts_are_fetched(url, words):
    if words is None:
        assert POLICY.source(url) is not None
    else:
        with pytest.raises(FetchRefused, match=words):
            POLICY.source(url)
    with pytest.raises(FetchRefused, match="fetches no image URLs"):
        FetchPolicy().source("http://images.example.com/a.png")


@pytest.mark.parametrize("address,allowed", [
    ("93.184.215.14", True), ("2606:4700::1111", True),
    ("10.1.2.3", True),  # in the allowed private network
    ("10.2.0.1", False), ("127.0.0.1", False), ("169.254.169.254", False),  # cloud metadata
    ("192.168.1.1", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.1.0.5", True),
])
def test_only_public_or_allowed_addresses_are_reached(address, allowed):
    ip = ipaddress.ip_address(address)
    if allowed:
        POLICY.check_address(ip)
    else:
        with pytest.raises(FetchRefused, match="non-public"):
            POLICY.check_address(ip)


def test_data_urls():
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    assert asyncio.run(DataUrl.parse(url).read(1000)) == png
    with pytest.raises(FetchRefused, match="exceeds 50 bytes"):
        asyncio.run(DataUrl.parse(url).read(50))
    for bad, words in [("data:text/html;base64,PGI+", "not an image"),
                       ("data:image/png;base64,@@@@", "not valid base64"),
                       ("data:image/png", "not a data: URL")]:
        with pytest.raises(FetchRefused, match=words):
            asyncio.run(DataUrl.parse(bad).read(1000))


def test_sizes_accepted():
    assert [output_side(s, 256, 2048) for s in ("auto", "256x256", "1024x1024", "16x16",
                                                 "2048x2048")] == [256, 256, 1024, 16, 2048]
    for size in ("1024x512", "15x15", "2049x2049", "0x0", "256", "256x256x3", "ax a",
                 "0256x0256", "9" * 40 + "x1"):
        with pytest.raises(ValueError, match="square size from 16x16 to 2048x2048"):
            output_side(size, 256, 2048)
    # --strict-size: the native size only.
    assert output_side("auto", 256, 2048, strict=True) == 256
    assert output_side("256x256", 256, 2048, strict=True) == 256
    with pytest.raises(ValueError, match=r"^'auto' or 256x256$"):
        output_side("512x512", 256, 2048, strict=True)


def test_resample_keeps_a_flat_colour_and_the_size():
    pixels = np.full((64, 64, 3), (200, 30, 90), np.uint8)
    for side in (16, 100, 1024):
        out = resample(pixels, side)
        assert out.shape == (side, side, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - (200, 30, 90)).max() <= 1
