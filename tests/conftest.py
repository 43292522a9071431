"""Shared fixtures: golden vectors, tiny random models in the official format, vLLM engines.

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by `build_llm`) with small KV
caches; engines are module-scoped so each starts once. Helpers are in helpers.py.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from model_registry.configs import GPTConfig
from model_registry.convert import convert
from model_registry.model_dir import ModelDir
from model_registry.synthetic import save_gpt_checkpoint, save_vq_checkpoint

from .helpers import (
    BUCKET,
    CREDENTIALS,
    GOLDEN,
    TINY_T2I,
    TINY_VQ,
    MotoServer,
    make_model_dir,
    tiny_config,
)


@pytest.fixture(scope="session")
def golden() -> Path:
    # In the repository: missing files are a broken checkout, never a skip.
    assert (GOLDEN / "c2i_expected.json").is_file(), f"golden vectors missing at {GOLDEN}"
    return GOLDEN


@pytest.fixture(scope="session")
def golden_expected(golden: Path) -> dict:
    return json.loads((golden / "c2i_expected.json").read_text())


@pytest.fixture(scope="session")
def golden_model(golden: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    out = tmp_path_factory.mktemp("golden") / "model"
    return convert(golden / "c2i_gpt.pt", str(golden / "c2i_gpt.json"), out,
                   vq_checkpoint=golden / "vq.pt", vq_model=str(golden / "vq.json"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    return make_model_dir(tmp_path_factory.mktemp("tiny16"), tiny_config(16), seed=1)


@pytest.fixture(scope="session")
def tiny_model_24(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    return make_model_dir(tmp_path_factory.mktemp("tiny24"), tiny_config(24), seed=2,
                          with_vq=False, name="tiny24")


@pytest.fixture(scope="session")
def t2i_served_model(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A servable tiny t2i model: random GPT, VQ decoder and tiny random T5 encoder."""
    from model_registry.synthetic import save_tiny_t5

    root = tmp_path_factory.mktemp("t2i_served")
    t5 = save_tiny_t5(root / "t5", d_model=TINY_T2I["caption_dim"])
    return convert(save_gpt_checkpoint(GPTConfig(**TINY_T2I), root / "gpt.pt", seed=5),
                   json.dumps(TINY_T2I), root / "captions",
                   vq_checkpoint=save_vq_checkpoint(TINY_VQ, root / "vq.pt", seed=5),
                   vq_model=json.dumps(TINY_VQ.to_dict()), text_encoder=str(t5))


@pytest.fixture(scope="module")
def engine_factory() -> Iterator:
    """Builds in-process engines; frees them when the module ends."""
    from engine.settings import EngineSettings
    from engine.vllm_api import build_llm

    made: list = []

    def make(model: ModelDir, **kwargs: object):
        settings = EngineSettings(**{"dtype": "float32", "max_num_seqs": 8,
                                     **{k: v for k, v in kwargs.items()
                                        if k in EngineSettings.model_fields}})
        overrides = {k: v for k, v in kwargs.items() if k not in EngineSettings.model_fields}
        llm = build_llm(model, settings, **overrides)
        made.append(llm)
        return llm

    yield make
    made.clear()
    gc.collect()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server with the bucket BUCKET, and credentials for it in the environment
    (the processes a test starts inherit them)."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # the servers started below inherit them
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
