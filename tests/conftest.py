"""Shared fixtures: golden vectors, tiny random models in the official format, vLLM engines.

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by `build_llm`) with small KV
caches; engines are module-scoped so each starts once.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_registry.configs import GPTConfig
from model_registry.convert import convert
from model_registry.model_dir import ModelDir
from model_registry.synthetic import save_gpt_checkpoint, save_vq_checkpoint
from vq_decoder.vq_model import VQConfig

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LLAMAGEN_GOLDEN", REPO.parent / "shared" / "data" / "golden"))

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


@pytest.fixture(scope="session")
def golden() -> Path:
    if not (GOLDEN / "c2i_expected.json").is_file():
        # CI always has ../shared; elsewhere say why instead of passing silently.
        if os.environ.get("CI"):
            pytest.fail(f"golden vectors missing at {GOLDEN}")
        pytest.skip(f"golden vectors not found at {GOLDEN} (set LLAMAGEN_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_expected(golden: Path) -> dict:
    return json.loads((golden / "c2i_expected.json").read_text())


@pytest.fixture(scope="session")
def golden_model(golden: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    out = tmp_path_factory.mktemp("golden") / "model"
    return convert(golden / "c2i_gpt.pt", str(golden / "c2i_gpt.json"), out,
                   vq_checkpoint=golden / "vq.pt", vq_model=str(golden / "vq.json"))


def make_model_dir(root: Path, config: GPTConfig, *, seed: int = 0, with_vq: bool = True,
                   name: str = "tiny") -> ModelDir:
    root.mkdir(parents=True, exist_ok=True)
    ckpt = save_gpt_checkpoint(config, root / "gpt.pt", seed=seed)
    vq = save_vq_checkpoint(TINY_VQ, root / "vq.pt", seed=seed) if with_vq else None
    return convert(ckpt, json.dumps(config.to_dict()), root / name,
                   vq_checkpoint=vq, vq_model=json.dumps(TINY_VQ.to_dict()) if vq else None)


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
    from server.engine import EngineSettings, build_llm

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
