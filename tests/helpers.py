"""What several test modules share: tiny models in the official format, the reference
generation the engine is held to, the CLI and a real server process as a user runs them,
the browser, and the deployment's metric names. Fixtures live in conftest.py."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from engine.conditions import Condition
from engine.sampling import SamplingOptions
from model_registry.configs import GPTConfig
from model_registry.convert import convert
from model_registry.generate import generate
from model_registry.model_dir import ModelDir
from model_registry.synthetic import save_gpt_checkpoint, save_vq_checkpoint
from model_registry.text_encoder import left_pad
from vq_decoder.vq_model import VQConfig

REPO = Path(__file__).resolve().parents[1]
# Golden vectors, copied into the repository (tests/golden/README.md says from where).
GOLDEN = REPO / "tests" / "golden"

# ---- tiny models ----

# A 2-layer GPT with head_dim 64 (the CPU attention backend needs >= 32) over a 256-code book.
TINY = dict(dim=128, n_layer=2, n_head=2, vocab_size=256, num_classes=10, cls_token_num=1,
            model_type="c2i", class_dropout_prob=0.1)
TINY_VQ = VQConfig(codebook_size=256, codebook_embed_dim=8, encoder_ch_mult=(1, 1, 2, 2, 2),
                   decoder_ch_mult=(1, 1, 2, 2, 2), z_channels=32, ch=32)
# The t2i twin: 120 caption slots of a 64-wide (tiny T5) caption, an 8x8 grid.
TINY_T2I = dict(dim=128, n_layer=2, n_head=2, vocab_size=256, caption_dim=64, cls_token_num=120,
                block_size=64, model_type="t2i", class_dropout_prob=0.1)


def tiny_config(grid: int = 16, **overrides: object) -> GPTConfig:
    return GPTConfig(**{**TINY, "block_size": grid * grid, **overrides})


def make_model_dir(root: Path, config: GPTConfig, *, seed: int = 0, with_vq: bool = True,
                   name: str = "tiny") -> ModelDir:
    root.mkdir(parents=True, exist_ok=True)
    ckpt = save_gpt_checkpoint(config, root / "gpt.pt", seed=seed)
    vq = save_vq_checkpoint(TINY_VQ, root / "vq.pt", seed=seed) if with_vq else None
    return convert(ckpt, json.dumps(config.to_dict()), root / name,
                   vq_checkpoint=vq, vq_model=json.dumps(TINY_VQ.to_dict()) if vq else None)


# ---- what the engine must reproduce ----

def classes(labels: list[int]) -> list[Condition]:
    return [Condition(label=label) for label in labels]


def reference(model: ModelDir, adapter: Path | None = None) -> torch.nn.Module:
    """The reference GPT, with a LoRA adapter merged into its weights by peft if given."""
    from model_registry.lora import merged_reference

    gpt = model.load_reference()
    return gpt if adapter is None else merged_reference(gpt, adapter)


def reference_tokens(model: ModelDir, labels: list[int], options: SamplingOptions,
                     prefix: list[list[int]] | None = None, negative: list[int] | None = None,
                     adapter: Path | None = None) -> list[list[int]]:
    """c2i: the reference loop's greedy tokens under the options' guidance (with `prefix`,
    one equal-length list per label: its completion, prefix included; `negative`: one class
    per label in the unconditional half; `adapter`: merged into the weights)."""
    return generate(reference(model, adapter), torch.tensor(labels),
                    cfg_scale=options.cfg_scale,
                    cfg_interval=options.cfg_interval, greedy=True,
                    prefix=torch.tensor(prefix) if prefix and prefix[0] else None,
                    negative=None if negative is None else torch.tensor(negative)).tolist()


def reference_t2i_tokens(model: ModelDir, valid: list[torch.Tensor], cfg_scale: float,
                         cfg_interval: int = -1, prefix: list[list[int]] | None = None,
                         negative: list[torch.Tensor] | None = None,
                         adapter: Path | None = None) -> list[list[int]]:
    """t2i: the reference's greedy tokens for captions' valid feature rows (left-padded and
    masked, as the original); `prefix` as in `reference_tokens`; `negative`: per caption, a
    negative caption's valid rows in the unconditional half (both halves masked by the union
    of the two masks, as the original masks both halves alike)."""
    features, masks = left_pad(valid)
    negatives = None
    if negative is not None:
        negatives, negative_masks = left_pad(negative)
        masks = masks | negative_masks
    return generate(reference(model, adapter), features, emb_masks=masks, cfg_scale=cfg_scale,
                    cfg_interval=cfg_interval, greedy=True,
                    prefix=torch.tensor(prefix) if prefix and prefix[0] else None,
                    negative=negatives).tolist()


def assert_c2i_matches_reference(engine: object, model: ModelDir, labels: list[int],
                                 plain: SamplingOptions, completion: SamplingOptions,
                                 prefix_len: int) -> None:
    """An engine's greedy tokens equal the reference's: `labels` generated under `plain`,
    then completed from random prefixes of `prefix_len` codes under `completion`."""
    tokens, _ = engine.generate(classes(labels), plain)
    assert tokens == reference_tokens(model, labels, plain)
    prefixes = [random_prefix(model, prefix_len, seed) for seed in labels]
    completed, _ = engine.generate(classes(labels), completion, prefixes)
    assert completed == reference_tokens(model, labels, completion, prefixes)


def completion_cases(grid: int) -> list[tuple[int, float, int]]:
    """(prefix length, cfg_scale, cfg_interval) the completion parity tests run: prefixes of
    0, one row, half the grid and all but one token, guided and not, and a cfg_interval
    that ends inside the half-grid prefix and one that ends after it."""
    n, half = grid * grid, grid * grid // 2
    cases = [(p, s, -1) for p in (0, grid, half, n - 1) for s in (1.0, 4.0)]
    return [*cases, (half, 3.0, half // 4), (half, 3.0, half + grid)]


def random_prefix(model: ModelDir, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.gpt.vocab_size, (length,), generator=g).tolist()


def pixels_close(a: np.ndarray, b: np.ndarray) -> bool:
    """The golden tolerance: at most 1 level off, in at most 0.1% of the values."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return bool(diff.max() <= 1 and (diff > 0).mean() <= 1e-3)


def assert_pixels_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert pixels_close(a, b), (diff.max(), (diff > 0).mean())


def decode_b64(b64: str) -> tuple[Image.Image, bytes]:
    """A response's base64 image -> (the picture, its file's bytes)."""
    data = base64.b64decode(b64)
    return Image.open(io.BytesIO(data)), data


# ---- OpenAI's published contract ----

# What OpenAI's schema requires of a response and of each stream event (the SDK's types
# leave most of it optional).
OPENAI_REQUIRED = {
    "ImagesResponse": ("created", "data", "size", "output_format", "quality", "background",
                       "usage"),
    "partial_image": ("type", "b64_json", "created_at", "size", "quality", "background",
                      "output_format", "partial_image_index"),
    "completed": ("type", "b64_json", "created_at", "size", "quality", "background",
                  "output_format", "usage"),
}


def nulls(node: object, path: str = "") -> list[str]:
    """Where a JSON value holds null."""
    if node is None:
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in nulls(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in nulls(v, f"{path}.{i}")]
    return []


def assert_openai(payload: dict, sdk_type: type) -> object:
    """A response or stream event as OpenAI's schema has it: the fields it requires, no
    null where it has strings, and the `openai` SDK's own type validates it strictly."""
    kind = payload.get("type", "ImagesResponse").rpartition(".")[2]
    missing = [f for f in OPENAI_REQUIRED[kind] if f not in payload]
    assert not missing, (missing, sorted(payload))
    assert not nulls(payload), nulls(payload)
    return sdk_type.model_validate(payload, strict=True)


def png_bytes(pixels: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, fmt)
    return buf.getvalue()


def mask_from_row(width: int, height: int, first_y: int) -> bytes:
    """An edit's mask, RGBA PNG: opaque above `first_y`, fully transparent (redrawn) from it
    down."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[first_y:] = 0
    rgba = np.dstack([np.zeros((height, width, 3), np.uint8), alpha])
    return png_bytes(rgba, "RGBA")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sse_payloads(response: httpx.Response) -> list[dict]:
    """The JSON of every event of a streamed response."""
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


# ---- the CLI ----

def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("llamagen: error:")]
    assert len(lines) == 1, result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# ---- a real `llamagen serve` process on loopback ----

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dirs: list[Path], workdir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        args = [sys.executable, "-m", "cli.main", "serve", "--model", *map(str, model_dirs),
                "--port", str(self.port), "--api-key", API_KEY, "--dtype", "float32",
                "--image-dir", str(workdir / "images"), "--c2pa-dir", str(workdir / "c2pa"),
                *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def __enter__(self) -> ServerProcess:
        """Started and ready; stopped on exit (whatever happened)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (name{labels} -> value)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # The engine's worker processes die with their parent; make sure of it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# ---- the browser ----

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LLAMAGEN_TEST_ARTIFACTS", REPO / "test-artifacts"))


def ensure_browser() -> None:
    """Install Debian's chromium if it is missing; skip (saying why) only if that fails."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True,
                       timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing and apt-get could not install it")


# ---- deployment ----

DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b(llamagen_[a-z_]+|vllm:[a-z_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def deploy_metric_names() -> set[str]:
    """Every metric the HPA, the adapter rules and the dashboard use (base names)."""
    texts = [(DEPLOY / "k8s" / "base" / "hpa.yaml").read_text(),
             (DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-values.yaml").read_text(),
             (DEPLOY / "compose" / "grafana" / "dashboards" / "llamagen.json").read_text()]
    names = set()
    for name in METRIC.findall("\n".join(texts)):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name.removesuffix(suffix)
        names.add(name)
    return names


# ---- content credentials ----

def read_credentials(data: bytes, fmt: str) -> tuple[str, dict]:
    """c2pa's Reader on an image: (validation state, the active manifest)."""
    import io

    import c2pa

    from vq_decoder.encoding import IMAGE_FORMATS

    reader = c2pa.Reader(IMAGE_FORMATS[fmt].media_type, io.BytesIO(data))
    return reader.get_validation_state(), reader.get_active_manifest()


# ---- a real S3 server (moto's) ----

BUCKET = "llamagen-images"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """moto's standalone S3 server on a loopback port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).parent / "moto_server"
        self.log = (workdir / "moto.log").open("w")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
