"""url-format images in shared S3-compatible storage, against a real S3 server process
(moto's standalone server, started here): two replicas share one bucket; a missing bucket or
missing credentials stop the start with one clear line; a store that goes away makes `url`
requests 503 while `b64_json` ones go on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
import pytest

from model_registry.demo import DEMO_MODEL
from server.image_store import S3ImageStore, StoreUnavailable

from .helpers import (
    API_KEY,
    BUCKET,
    CREDENTIALS,
    MotoServer,
    ServerProcess,
    assert_one_line_error,
    run_cli,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
def store_flags(s3: MotoServer, bucket: str = BUCKET) -> list[str]:
    return ["--image-store", f"s3://{bucket}/served", "--image-store-endpoint", s3.url]


def workdir(root: Path, name: str) -> Path:
    (root / name).mkdir()
    return root / name


def test_store_round_trip_and_expiry(s3):
    async def run() -> None:
        store = S3ImageStore(f"s3://{BUCKET}/unit", ttl_s=3600, endpoint_url=s3.url)
        await store.start()
        name = await store.save(b"\x89PNG fake", "png")
        data, spec = await store.get(name)
        assert data == b"\x89PNG fake" and spec.media_type == "image/png"
        assert await store.get("0" * 32 + ".png") is None  # unknown
        assert await store.get("../etc/passwd") is None  # malformed: never asked for
        expired = S3ImageStore(f"s3://{BUCKET}/unit", ttl_s=1e-6, endpoint_url=s3.url)
        assert await expired.get(name) is None
        key = boto3.client("s3", endpoint_url=s3.url).head_object(Bucket=BUCKET,
                                                                  Key=f"unit/{name}")
        assert key["ContentType"] == "image/png"

    asyncio.run(run())


def test_a_url_from_one_replica_is_served_by_another(s3, tmp_path):
    with ServerProcess([DEMO_MODEL], workdir(tmp_path, "a"), *store_flags(s3)) as first, \
            ServerProcess([DEMO_MODEL], workdir(tmp_path, "b"), *store_flags(s3)) as second:
        made = httpx.post(f"{first.url}/v1/images/generations", headers=AUTH, timeout=60,
                          json={"prompt": "red circle", "response_format": "url", "seed": 1})
        url = made.json()["data"][0]["url"]
        fetched_at_first = httpx.get(url, headers=AUTH)
        fetched_at_second = httpx.get(url.replace(first.url, second.url), headers=AUTH)
        assert fetched_at_first.status_code == fetched_at_second.status_code == 200
        assert fetched_at_second.content == fetched_at_first.content  # byte-identical
        assert fetched_at_second.headers["content-type"] == "image/png"
        assert not list((tmp_path / "a" / "images").glob("*.png"))  # nothing on local disk


def test_a_missing_bucket_or_credentials_stop_the_start(s3, tmp_path):
    assert_one_line_error(run_cli("serve", *store_flags(s3, "no-such-bucket")),
                          "the bucket does not exist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    result = subprocess.run([sys.executable, "-m", "cli.main", "serve", *store_flags(s3)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(result, "image store s3://")
    assert "credentials" in result.stderr.lower()


def test_a_store_outage_fails_url_requests_only(tmp_path, monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    s3 = MotoServer(tmp_path)
    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket=BUCKET)
    with ServerProcess([DEMO_MODEL], workdir(tmp_path, "server"), *store_flags(s3)) as server:
        body = {"prompt": "1", "response_format": "url"}
        assert httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, json=body,
                          timeout=60).status_code == 200
        s3.stop()
        refused = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, json=body,
                             timeout=60)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "image_store_unavailable"
        b64 = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=60,
                         json={"prompt": "1", "response_format": "b64_json"})
        assert b64.status_code == 200 and b64.json()["data"][0]["b64_json"]
        # Omitted (both, by default): the image still comes, as b64_json alone.
        either = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=60,
                            json={"prompt": "1"})
        assert either.status_code == 200
        (image,) = either.json()["data"]
        assert image["b64_json"] and "url" not in image
        missing = httpx.get(f"{server.url}/v1/images/files/{'0' * 32}.png", headers=AUTH)
        assert missing.status_code == 503  # unknown is not the same as unreachable
    with pytest.raises(StoreUnavailable):
        asyncio.run(S3ImageStore(f"s3://{BUCKET}", 60, endpoint_url=s3.url).start())
