"""The compiled model: vLLM's `@support_torch_compile` path (what CUDA graphs capture on a
GPU), here with vLLM's CPU backend (inductor), as `--no-enforce-eager` runs it. Greedy tokens
equal the reference's, as the eager engine's do: c2i and t2i, with and without a prefix. One
compiled engine per task, compiled once for the module."""

from __future__ import annotations

import pytest
import torch

from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions

from .helpers import assert_c2i_matches_reference, random_prefix, reference_t2i_tokens


@pytest.fixture(scope="module")
def compiled(engine_factory):
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
    from vllm.config import CompilationMode

    from model_registry.vllm_model import LlamaGenForCausalLM

    # Compiled, not silently eager: the model is vLLM-compilable, and the engine compiles.
    assert issubclass(LlamaGenForCausalLM, TorchCompileWithNoGuardsWrapper)

    def make(model):
        llm = engine_factory(model, max_num_seqs=4, enforce_eager=False)
        config = llm.llm_engine.vllm_config
        assert not config.model_config.enforce_eager
        assert config.compilation_config.mode != CompilationMode.NONE
        return OfflineGenerator(model, llm)

    return make


def test_compiled_c2i_tokens_equal_the_reference(compiled, tiny_model):
    # Then a completion: half the grid given, guidance ending inside it.
    assert_c2i_matches_reference(compiled(tiny_model), tiny_model, [0, 3, 7, 9],
                                 SamplingOptions(cfg_scale=3.0, greedy=True),
                                 SamplingOptions(cfg_scale=3.0, cfg_interval=64, greedy=True),
                                 prefix_len=128)


def test_compiled_t2i_tokens_equal_the_reference(compiled, t2i_served_model):
    model = t2i_served_model
    engine = compiled(model)
    g = torch.Generator().manual_seed(0)
    valid = [0.25 * torch.randn(n, model.gpt.caption_dim, generator=g) for n in (1, 30, 120)]
    conditions = engine.caption_features(valid)
    options = SamplingOptions(cfg_scale=4.0, greedy=True)
    tokens, _ = engine.generate(conditions, options)
    assert tokens == reference_t2i_tokens(model, valid, 4.0)
    prefixes = [random_prefix(model, 32, seed) for seed in range(3)]
    completed, _ = engine.generate(conditions, options, prefixes)
    assert completed == reference_t2i_tokens(model, valid, 4.0, prefix=prefixes)
