"""Tensor parallel on this CPU machine (vLLM's CPU backend runs one rank per process, here one
core each): greedy tokens with tensor_parallel_size=2 equal tensor_parallel_size=1 exactly,
for a c2i and a t2i model, with guidance on and off. Each rank holds half the heads of both
CFG streams, so guidance must survive the split."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from engine.settings import EngineSettings
from engine.vllm_api import build_llm, cpu_binding
from model_registry.configs import GPTConfig
from model_registry.convert import convert
from model_registry.synthetic import save_gpt_checkpoint

from .helpers import TINY_T2I, classes, make_model_dir, tiny_config

SETTINGS = [SamplingOptions(cfg_scale=4.0, greedy=True), SamplingOptions(cfg_scale=1.0,
                                                                         greedy=True)]


@pytest.fixture(autouse=True)
def restore_binding(monkeypatch):
    """The engine sets VLLM_CPU_OMP_THREADS_BIND for its ranks (engine.vllm_api); later
    single-rank engines in this process must not inherit it."""
    assert len(os.sched_getaffinity(0)) >= 2, "tensor parallel needs 2 cores here"
    # setenv then delenv: the undo restores the variable as it was before the test, absent
    # included, whatever the engine sets meanwhile.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    yield
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") in (None, cpu_binding(2))


def tokens_at(model, tp: int, make_conditions) -> list[list[list[int]]]:
    """Greedy tokens for every setting, from an engine of `tp` ranks (freed afterwards, so
    that two engines never run at once)."""
    llm = build_llm(model, EngineSettings(dtype="float32", max_num_seqs=4,
                                          tensor_parallel_size=tp))
    generator = OfflineGenerator(model, llm)
    try:
        return [generator.generate(make_conditions(generator), options)[0]
                for options in SETTINGS]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del generator, llm
        gc.collect()


def test_cpu_binding_splits_the_cores():
    assert cpu_binding(1).count("|") == 0
    assert len(cpu_binding(2).split("|")) == 2
    with pytest.raises(ValueError):
        cpu_binding(10**6)


def test_c2i_tensor_parallel_equals_one_rank(tmp_path):
    model = make_model_dir(tmp_path, tiny_config(16), seed=4)
    labels = classes([0, 3, 7, 9])
    one = tokens_at(model, 1, lambda _: labels)
    two = tokens_at(model, 2, lambda _: labels)
    assert two == one
    assert one[0] != one[1]  # guidance changed the images: both settings were exercised


def test_t2i_tensor_parallel_equals_one_rank(tmp_path):
    ckpt = save_gpt_checkpoint(GPTConfig(**TINY_T2I), tmp_path / "t2i.pt", seed=6)
    model = convert(ckpt, json.dumps(TINY_T2I), tmp_path / "model")
    g = torch.Generator().manual_seed(6)
    features = [torch.randn(n, TINY_T2I["caption_dim"], generator=g) for n in (1, 17, 120)]
    one = tokens_at(model, 1, lambda gen: gen.caption_features(features))
    two = tokens_at(model, 2, lambda gen: gen.caption_features(features))
    assert two == one
    assert one[0] != one[1]
