"""`llamagen sample` on Ray Data, against one local Ray instance for the module (started
here with `ray start`, as a cluster would be; the runs reach it with `--address`): a class
run's .npz equals `llamagen generate` for the same seeds, pixel for pixel, and one sample is
regenerated alone; a run whose driver is SIGKILLed mid-way and run again (to the S3 server
the suite uses) gives exactly the same samples; a Batch file with good and bad lines gets one
line each; bad flags and inputs are one line and exit 2 before anything starts."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from openai.types import ImagesResponse
from PIL import Image

from engine.decoding import encode_images
from model_registry.demo import DEMO_MODEL
from model_registry.model_dir import load_model_dir
from vq_decoder.encoding import read_metadata

from .helpers import (
    BUCKET,
    MotoServer,
    assert_one_line_error,
    assert_openai,
    data_url,
    free_port,
    mask_from_row,
    run_cli,
)

SAMPLES, SHARD = 96, 8
EDITS = "/v1/images/edits"
RUN_FLAGS = ["--num-samples", str(SAMPLES), "--labels", "balanced", "--shard-size", str(SHARD),
             "--seed", "5", "--outputs", "npz", "images", "--merge"]


@pytest.fixture(scope="module")
def ray_address(s3: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Ray instance (its workers inherit the S3 credentials set by `s3`), with its own
    token (Ray's token authentication is on by default; the runs started here inherit it)."""
    ray = str(Path(sys.executable).parent / "ray")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "2",
                    "--object-store-memory", str(500 * 2**20), "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True,
                   capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value


def sample(*args: str, address: str, timeout: float = 600) -> dict:
    result = run_cli("sample", *args, "--address", address, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def npz(data: bytes | Path) -> dict[str, np.ndarray]:
    raw = data.read_bytes() if isinstance(data, Path) else data
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def png_pixels(data: bytes | Path) -> np.ndarray:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return np.array(Image.open(io.BytesIO(raw)).convert("RGB"))


@pytest.fixture(scope="module")
def uninterrupted(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    summary = sample(*RUN_FLAGS, "--out", str(out), address=ray_address)
    assert summary["samples"] == SAMPLES and summary["shards"] == SAMPLES // SHARD
    assert summary["shards_resumed"] == 0 and summary["merged"] == str(out / "samples.npz")
    return out


EDITED, EDIT_LABEL, EDIT_ROWS = 3, 5, 3  # a Batch edit line: sample 3, completed as class 5


@pytest.fixture(scope="module")
def generated(uninterrupted: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One `llamagen generate` of the run's labels with the run's seed (image i: seed 5 + i),
    then one more image: class EDIT_LABEL completing the first EDIT_ROWS token rows of
    sample EDITED's PNG (what the Batch test's edit line asks for, with seed 5 + SAMPLES)."""
    model = load_model_dir(DEMO_MODEL)
    labels = npz(uninterrupted / "samples.npz")["labels"].tolist()
    source = png_pixels(uninterrupted / "images" / f"{EDITED:06d}_{labels[EDITED]}.png")
    codes = encode_images(model.vq_encoder(), [source])[0][: EDIT_ROWS * model.grid_size]
    out = tmp_path_factory.mktemp("generated")
    (out / "prefixes.json").write_text(json.dumps([[]] * SAMPLES + [codes]))
    result = run_cli("generate", "--labels", *map(str, [*labels, EDIT_LABEL]), "--seed", "5",
                     "--prefix-tokens", str(out / "prefixes.json"), "--out-dir",
                     str(out / "images"))
    assert result.returncode == 0, result.stderr[-3000:]
    paths = sorted((out / "images").glob("*.png"))
    assert len(paths) == SAMPLES + 1
    return paths


def test_npz_equals_generate_pixel_for_pixel(uninterrupted: Path, generated: list[Path],
                                             tmp_path: Path):
    merged = npz(uninterrupted / "samples.npz")
    model = load_model_dir(DEMO_MODEL)
    classes = model.gpt.num_classes
    assert merged["arr_0"].dtype == np.uint8
    assert merged["arr_0"].shape == (SAMPLES, model.image_size, model.image_size, 3)
    assert merged["indices"].tolist() == list(range(SAMPLES))
    assert merged["labels"].tolist() == [i % classes for i in range(SAMPLES)]  # balanced
    assert merged["seeds"].tolist() == [5 + i for i in range(SAMPLES)]
    # The shards hold the same, in the same layout.
    first = npz(uninterrupted / "shards" / "shard-000001.npz")
    assert np.array_equal(first["arr_0"], merged["arr_0"][SHARD: 2 * SHARD])

    # `generate` over all the labels with the run's seed: the same pixels.
    equal = [np.array_equal(png_pixels(p), merged["arr_0"][i])
             for i, p in enumerate(generated[:SAMPLES])]
    assert all(equal), f"{equal.count(False)} samples differ from generate's"
    assert not np.array_equal(merged["arr_0"][0], merged["arr_0"][classes])  # seeds matter

    # One sample alone, from its label and seed.
    i = 37
    result = run_cli("generate", "--labels", str(merged["labels"][i]), "--seed",
                     str(merged["seeds"][i]), "--out-dir", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr[-3000:]
    (alone,) = (tmp_path / "one").glob("*.png")
    assert np.array_equal(png_pixels(alone), merged["arr_0"][i])

    # The image files: the same pixels, and their provenance says how to redraw them.
    files = sorted((uninterrupted / "images").glob("*.png"))
    assert [f.name for f in files[:2]] == ["000000_0.png", "000001_1.png"]
    assert np.array_equal(png_pixels(files[i]), merged["arr_0"][i])
    record = json.loads(Image.open(files[i]).text["llamagen"])
    assert record["seed"] == 5 + i and record["class_label"] == i % classes


def test_killed_run_resumes_to_the_same_samples(uninterrupted: Path, ray_address: str,
                                                s3: MotoServer):
    out = f"s3://{BUCKET}/sample-run"
    client = boto3.client("s3", endpoint_url=s3.url)
    args = [sys.executable, "-m", "cli.main", "sample", *RUN_FLAGS, "--out", out,
            "--store-endpoint", s3.url, "--address", ray_address]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def finished() -> int:
        try:
            obj = client.get_object(Bucket=BUCKET, Key="sample-run/manifest.json")
        except client.exceptions.NoSuchKey:
            return 0
        return len(json.loads(obj["Body"].read())["shards"])

    deadline = time.monotonic() + 300
    while finished() < 2:
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard finished in 300 s"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    done = finished()
    assert 2 <= done < SAMPLES // SHARD, f"{done} shards had finished when killed"

    summary = sample(*RUN_FLAGS, "--out", out, "--store-endpoint", s3.url,
                     address=ray_address)
    assert summary["samples"] == SAMPLES and summary["shards_resumed"] == done
    assert summary["shards_run"] == SAMPLES // SHARD - done
    manifest = json.loads(client.get_object(
        Bucket=BUCKET, Key="sample-run/manifest.json")["Body"].read())
    assert sorted(manifest["order"]) == list(range(SAMPLES // SHARD))  # each shard once
    resumed = npz(client.get_object(Bucket=BUCKET, Key="sample-run/samples.npz")["Body"].read())
    reference = npz(uninterrupted / "samples.npz")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert np.array_equal(resumed[key], reference[key]), key
    image = client.get_object(Bucket=BUCKET, Key="sample-run/images/000050_0.png")
    assert np.array_equal(png_pixels(image["Body"].read()), reference["arr_0"][50])

    # The same --out with other flags is another run: refused before anything starts.
    other = run_cli("sample", *RUN_FLAGS[:-4], "--seed", "6", "--outputs", "npz", "images",
                    "--merge", "--out", out, "--store-endpoint", s3.url)
    assert_one_line_error(other, "holds another run (it differs in ")


def batch_line(custom_id: str, body: dict, url: str = "/v1/images/generations") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def edit_line(custom_id: str, image: str, **body: object) -> str:
    return batch_line(custom_id, {"images": [{"image_url": image}], **body}, EDITS)


def test_batch_file_answers_every_line(uninterrupted: Path, generated: list[Path],
                                       ray_address: str, tmp_path: Path):
    model = load_model_dir(DEMO_MODEL)
    name = model.class_names[3]
    (path,) = (uninterrupted / "images").glob(f"{EDITED:06d}_*.png")
    source = path.read_bytes()  # an edit's input
    side = model.image_size
    lines = [
        batch_line("same-as-sample-3", {"prompt": name, "seed": 8, "model": model.name}),
        "{not json",
        batch_line("two", {"prompt": "1", "n": 2, "response_format": "url"}),
        json.dumps({"method": "POST", "url": "/v1/images/generations", "body": {}}),
        batch_line("unknown-class", {"prompt": "no such class"}),
        batch_line("two", {"prompt": "2"}),  # a repeated custom_id
        batch_line("too-many", {"prompt": "2", "n": 11}),
        edit_line("edit", data_url(source), prompt=model.class_names[EDIT_LABEL],
                  keep_rows=EDIT_ROWS, seed=5 + SAMPLES),
        batch_line("stream", {"prompt": "2", "stream": True}),
        batch_line("bad-size", {"prompt": "2", "size": "64x32"}),
        batch_line("wrong-model", {"prompt": "2", "model": "dall-e-3"}),
        batch_line("no-seed", {"prompt": "4", "negative_prompt": "5", "size": "128x128"}),
        batch_line("negative-unguided", {"prompt": "4", "negative_prompt": "5",
                                         "cfg_scale": 1.0}),
        # Edits: a mask's rows (its first transparent row is 35 of 64: token row 4 of 8).
        edit_line("edit-mask", data_url(source), prompt="6", n=2,
                  mask={"image_url": data_url(mask_from_row(side, side, 35))}),
        edit_line("edit-http", "http://127.0.0.1:9/x.png", prompt="6"),
        batch_line("edit-file-id", {"images": [{"file_id": "file-1"}], "prompt": "6"}, EDITS),
        edit_line("edit-mask-and-rows", data_url(source), prompt="6", keep_rows=2,
                  mask={"image_url": data_url(mask_from_row(side, side, 35))}),
        edit_line("edit-not-an-image", data_url(b"GIF89a not really"), prompt="6"),
        edit_line("edit-wrong-mask", data_url(source), prompt="6",
                  mask={"image_url": data_url(mask_from_row(side // 2, side // 2, 8))}),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "batch"
    summary = sample("--batch-input", str(requests), "--out", str(out), "--shard-size", "5",
                     address=ray_address)
    assert summary["lines"] == len(lines) and summary["samples"] == 7
    assert summary["failed_lines"] == 14
    output = [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]
    assert len(output) == len(lines)
    assert len({o["id"] for o in output}) == len(lines)
    by_id = {o["custom_id"]: o for o in output if o["custom_id"] and o["error"] is None}

    ok = by_id["same-as-sample-3"]["response"]
    assert ok["status_code"] == 200 and ok["request_id"].startswith("req_")
    body = assert_openai(ok["body"], ImagesResponse)
    assert body.size == f"{model.image_size}x{model.image_size}" and body.usage is not None
    assert ok["body"]["data"][0]["seed"] == 8
    # Class 3 with seed 8 is sample 3 of the class run (balanced labels, seeds 5 + i).
    pixels = png_pixels(base64.b64decode(ok["body"]["data"][0]["b64_json"]))
    assert np.array_equal(pixels, npz(uninterrupted / "samples.npz")["arr_0"][3])

    two = by_id["two"]["response"]["body"]["data"]
    assert [d.keys() >= {"url"} and "b64_json" not in d for d in two] == [True, True]
    assert all(Path(d["url"].removeprefix("file://")).is_file() for d in two)
    assert two[0]["seed"] != two[1]["seed"]

    no_seed = by_id["no-seed"]["response"]["body"]
    assert no_seed["size"] == "128x128" and no_seed["native_size"] == "64x64"
    assert no_seed["data"][0]["seed"] == 11 * 10  # run seed 0 + line 11 x 10 images a line

    # An edit line completes its image as `generate` completes the same codes.
    edit = by_id["edit"]["response"]["body"]
    assert_openai(edit, ImagesResponse)
    assert edit["data"][0]["kept_rows"] == EDIT_ROWS
    grid = model.grid_size
    assert edit["usage"]["input_tokens_details"] == {"text_tokens": 1,
                                                     "image_tokens": EDIT_ROWS * grid}
    edited = base64.b64decode(edit["data"][0]["b64_json"])
    assert np.array_equal(png_pixels(edited), png_pixels(generated[SAMPLES]))
    record = read_metadata(edited)
    assert record["edit"] == {"kept_rows": EDIT_ROWS, "grid_rows": grid,
                              "source_sha256": hashlib.sha256(source).hexdigest()}
    assert record["seed"] == 5 + SAMPLES and record["class_label"] == EDIT_LABEL
    masked = by_id["edit-mask"]["response"]["body"]["data"]
    assert [d["kept_rows"] for d in masked] == [4, 4] and masked[0]["seed"] != masked[1]["seed"]

    errors = {o["custom_id"]: o for o in output if o["error"] is not None}
    assert errors["two"]["error"]["code"] == "duplicate_custom_id"
    assert sorted(o["error"]["code"] for o in output if o["custom_id"] is None) == [
        "invalid_json", "missing_custom_id"]
    statuses = {key: (o["response"]["status_code"], o["response"]["body"]["error"]["param"])
                for key, o in by_id.items() if o["response"]["status_code"] != 200}
    assert statuses == {"unknown-class": (400, "prompt"), "too-many": (400, "n"),
                        "stream": (400, "stream"), "bad-size": (400, "size"),
                        "wrong-model": (404, "model"),
                        "negative-unguided": (400, "negative_prompt"),
                        "edit-http": (400, "images.0.image_url"),
                        "edit-file-id": (400, "images.0.file_id"),
                        "edit-mask-and-rows": (400, "keep_rows"),
                        "edit-not-an-image": (400, "images.0.image_url"),
                        "edit-wrong-mask": (400, "mask")}
    for o in output:
        if o["response"] is not None and o["response"]["status_code"] != 200:
            envelope = o["response"]["body"]["error"]
            assert set(envelope) == {"message", "type", "param", "code"}
            assert "Traceback" not in envelope["message"]


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "OUT"], "give one input"),
    (["--num-samples", "4", "--caption-file", "x.txt", "--out", "OUT"], "give one input"),
    (["--caption-file", "CAPTIONS", "--out", "OUT"], "class-conditional"),
    (["--label-file", "LABELS", "--out", "OUT"], "LABELS:2: "),
    (["--label-file", "MISSING", "--out", "OUT"], "No such file"),
    (["--num-samples", "4", "--out", "http://example.com/x"], "a directory or s3://"),
    (["--num-samples", "4", "--actors", "0", "--out", "OUT"], "--actors: "),
])
def test_bad_flags_and_inputs_are_one_line(args: list[str], message: str, tmp_path: Path):
    (tmp_path / "captions.txt").write_text("a red circle\n")
    (tmp_path / "labels.txt").write_text("3\nno such class\n")
    paths = {"OUT": str(tmp_path / "out"), "CAPTIONS": str(tmp_path / "captions.txt"),
             "LABELS": str(tmp_path / "labels.txt"), "MISSING": str(tmp_path / "missing.txt")}
    result = run_cli("sample", *[paths.get(a, a) for a in args])
    assert_one_line_error(result, message.replace("LABELS", paths["LABELS"]))
    assert not (tmp_path / "out").exists()


def test_inputs_become_items(tmp_path: Path):
    """Labels, captions and Batch lines as the run's items, without Ray or an engine."""
    from jobs.job import InputError, batch_items, caption_items, class_items

    model = load_model_dir(DEMO_MODEL)
    classes = model.gpt.num_classes
    uniform = class_items(model, 500, "uniform", seed=3)
    assert [item["index"] for item in uniform] == list(range(500))
    labels = [item["label"] for item in uniform]
    assert set(labels) == set(range(classes))  # every class drawn, from the run's seed
    assert class_items(model, 500, "uniform", seed=3) == uniform
    assert [i["label"] for i in class_items(model, 500, "uniform", seed=4)] != labels
    balanced = [item["label"] for item in class_items(model, 25, "balanced", seed=3)]
    assert [balanced.count(c) for c in range(classes)] == [3] * 5 + [2] * 5

    (tmp_path / "labels.txt").write_text(f"3\n\n{model.class_names[7].upper()}\n")
    assert class_items(model, 0, "uniform", 0, str(tmp_path / "labels.txt")) == [
        {"index": 0, "label": 3}, {"index": 1, "label": 7}]

    (tmp_path / "captions.txt").write_text("a red circle\n\n  a blue square  \n")
    assert caption_items(str(tmp_path / "captions.txt")) == [
        {"index": 0, "caption": "a red circle"}, {"index": 1, "caption": "a blue square"}]
    (tmp_path / "captions.jsonl").write_text(
        '{"caption": "one"}\n{"prompt": "two", "id": 7}\n')
    assert [i["caption"] for i in caption_items(str(tmp_path / "captions.jsonl"))] == [
        "one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "one"}\n{"caption": 3}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a non-empty"):
        caption_items(str(tmp_path / "bad.jsonl"))

    (tmp_path / "batch.jsonl").write_text("\n".join([
        batch_line("a", {"prompt": "1"}), "not json", batch_line("a", {"prompt": "2"})]))
    items = batch_items(str(tmp_path / "batch.jsonl"))
    assert [i["line"] for i in items] == [0, 1, 2]
    assert [i.get("duplicate", False) for i in items] == [False, False, True]
