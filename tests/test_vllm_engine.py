"""The vLLM engine: golden tokens, token-exact parity with the reference under continuous
batching and preemption, seeded sampling, and the CFG processor's guarantees."""

from __future__ import annotations

import pytest
import torch

from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from model_registry.cfg import guidance_args
from model_registry.plugin import CFG_PROCESSOR

from .helpers import (
    assert_c2i_matches_reference,
    classes,
    completion_cases,
    random_prefix,
    reference_tokens,
)


@pytest.fixture(scope="module")
def golden_engine(golden_model, engine_factory):
    return OfflineGenerator(golden_model, engine_factory(golden_model, max_num_seqs=4))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model, engine_factory):
    # max_num_seqs below the request count: requests queue, join and leave the batch.
    return OfflineGenerator(tiny_model, engine_factory(tiny_model, max_num_seqs=3))


def test_engine_golden_greedy_tokens(golden_engine, golden_expected):
    for setting in golden_expected["settings"]:
        options = SamplingOptions(cfg_scale=setting["cfg_scale"],
                                  cfg_interval=setting["cfg_interval"], greedy=True)
        tokens, _ = golden_engine.generate(classes(golden_expected["labels"]), options)
        assert tokens == setting["tokens"], setting


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (1.5, -1), (4.0, -1),
                                                    (3.0, 0), (3.0, 40)])
def test_parity_with_reference_16x16(tiny_engine, tiny_model, cfg_scale, cfg_interval):
    labels = [0, 3, 9]
    options = SamplingOptions(cfg_scale=cfg_scale, cfg_interval=cfg_interval, greedy=True)
    tokens, _ = tiny_engine.generate(classes(labels), options)
    assert tokens == reference_tokens(tiny_model, labels, options)


def test_parity_with_reference_24x24(tiny_model_24, engine_factory):
    engine = OfflineGenerator(tiny_model_24, engine_factory(tiny_model_24, max_num_seqs=4))
    labels = [2, 7]
    for options in (SamplingOptions(cfg_scale=2.0, greedy=True),
                    SamplingOptions(cfg_scale=1.0, greedy=True)):
        tokens, _ = engine.generate(classes(labels), options)
        assert all(len(t) == 576 for t in tokens)
        assert tokens == reference_tokens(tiny_model_24, labels, options)


def test_parity_mixed_requests_under_continuous_batching(tiny_engine, tiny_model):
    """Ten requests with different guidance in one submission, three running at a time."""
    from vllm.inputs import TokensPrompt

    from engine.conditions import class_prompt_ids
    from engine.vllm_api import sampling_params

    cases = [(label, SamplingOptions(cfg_scale=s, cfg_interval=i, greedy=True))
             for label, s, i in [(0, 4.0, -1), (1, 1.0, -1), (2, 2.5, 10), (3, 7.0, -1),
                                 (4, 1.5, 0), (5, 4.0, 100), (6, 0.0, -1), (7, 3.0, -1),
                                 (8, 5.0, 3), (9, 1.25, -1)]]
    prompts = [TokensPrompt(prompt_token_ids=class_prompt_ids(tiny_model, label))
               for label, _ in cases]
    params = [sampling_params(tiny_model, opts, None) for _, opts in cases]
    outputs = tiny_engine.llm.generate(prompts, params, use_tqdm=False)
    for (label, opts), out in zip(cases, outputs, strict=True):
        assert list(out.outputs[0].token_ids) == reference_tokens(tiny_model, [label], opts)[0]


def test_parity_under_preemption(tiny_model, engine_factory):
    """A KV cache for two whole images, six running: the scheduler preempts and recomputes,
    completions (prompts ending in image codes) included."""
    from vllm.v1.metrics.reader import Counter

    from engine.settings import EngineSettings
    from engine.vllm_api import cpu_kv_cache_bytes

    kv_gib = cpu_kv_cache_bytes(tiny_model, EngineSettings(max_num_seqs=2), "float32") / 2**30
    llm = engine_factory(tiny_model, max_num_seqs=6, kv_cache_gib=kv_gib,
                         disable_log_stats=False, enable_prefix_caching=False)
    # Then completions: guidance ends at image token 61, after the 48-token prefix.
    assert_c2i_matches_reference(OfflineGenerator(tiny_model, llm), tiny_model,
                                 [0, 1, 2, 3, 4, 5],
                                 SamplingOptions(cfg_scale=3.0, greedy=True),
                                 SamplingOptions(cfg_scale=3.0, cfg_interval=60, greedy=True),
                                 prefix_len=48)
    preemptions = sum(m.value for m in llm.get_metrics()
                      if m.name == "vllm:num_preemptions" and isinstance(m, Counter))
    assert preemptions > 0


def test_fp8_kv_cache_holds_four_times_the_images_of_fp32(engine_factory, tiny_model):
    """--kv-cache-dtype fp8: one byte per value, so the same GiB holds 4x the tokens of an
    fp32 cache (as vLLM allocates it, and as our sizing counts it); images still come out
    whole. (Token parity is not expected: fp8 keys and values are an approximation, which
    docs/BENCHMARKS.md measures.)"""
    from engine.settings import EngineSettings
    from engine.vllm_api import cpu_kv_cache_bytes, kv_cache_tokens

    gib = 0.01
    fp8 = engine_factory(tiny_model, max_num_seqs=4, kv_cache_gib=gib, kv_cache_dtype="fp8")
    fp8_tokens = kv_cache_tokens(fp8)
    tokens, _ = OfflineGenerator(tiny_model, fp8).generate(
        classes([1, 2]), SamplingOptions(cfg_scale=3.0, greedy=True))
    assert [len(t) for t in tokens] == [256, 256]
    assert all(0 <= t < tiny_model.gpt.vocab_size for image in tokens for t in image)
    del fp8
    import gc

    gc.collect()
    fp32 = engine_factory(tiny_model, max_num_seqs=4, kv_cache_gib=gib)
    assert 3.8 <= fp8_tokens / kv_cache_tokens(fp32) <= 4.2
    # Sized for max_num_seqs images, an fp8 cache takes a quarter of the fp32 bytes.
    assert cpu_kv_cache_bytes(tiny_model, EngineSettings(max_num_seqs=4, kv_cache_dtype="fp8"),
                              "float32") * 4 == cpu_kv_cache_bytes(
        tiny_model, EngineSettings(max_num_seqs=4), "float32")


def test_completion_parity_in_one_mixed_batch(tiny_engine, tiny_model):
    """Completions (prefixes of 0, one row, half, all but one token; guided or not; a
    cfg_interval ending inside and after the prefix) and plain requests, all in one
    submission with three running at a time: each equals the reference's completion."""
    from engine.conditions import Condition
    from engine.vllm_api import sampling_params

    cases = [(label, random_prefix(tiny_model, p, seed=label), SamplingOptions(
        cfg_scale=s, cfg_interval=i, greedy=True))
        for label, (p, s, i) in enumerate(completion_cases(16))]
    prompts = [Condition(label=label % 10).prompt(tiny_model, prefix)
               for label, prefix, _ in cases]
    params = [sampling_params(tiny_model, opts, None, prefix_len=len(prefix))
              for _, prefix, opts in cases]
    outputs = tiny_engine.llm.generate(prompts, params, use_tqdm=False)
    for (label, prefix, opts), out in zip(cases, outputs, strict=True):
        grid = prefix + list(out.outputs[0].token_ids)
        assert grid == reference_tokens(tiny_model, [label % 10], opts, [prefix])[0], \
            (len(prefix), opts)


def test_negative_class_parity_in_mixed_batches(tiny_engine, tiny_model):
    """Negative classes in the unguided stream, beside requests without one, in one
    submission: guided, unguided and completing a prefix, each equal to the reference loop
    with the negative class in its unconditional half."""
    from engine.conditions import Condition

    labels, negatives = [0, 1, 2, 3, 4, 5], [None, 7, None, 3, 9, 0]
    conditions = [Condition(label=label).with_negative(None if n is None else Condition(label=n))
                  for label, n in zip(labels, negatives, strict=True)]
    for options, prefix_len in [(SamplingOptions(cfg_scale=4.0, greedy=True), 0),
                                (SamplingOptions(cfg_scale=1.0, greedy=True), 0),
                                (SamplingOptions(cfg_scale=3.0, cfg_interval=40, greedy=True), 32)]:
        prefixes = [random_prefix(tiny_model, prefix_len, seed) for seed in labels]
        tokens, _ = tiny_engine.generate(conditions, options, prefixes)
        for label, n, prefix, got in zip(labels, negatives, prefixes, tokens, strict=True):
            kept = [prefix] if prefix_len else None
            expected = reference_tokens(tiny_model, [label], options, kept,
                                        None if n is None else [n])[0]
            assert got == expected, (label, n, options)
            plain = reference_tokens(tiny_model, [label], options, kept)[0]
            # Guidance away from a class changes the picture; without guidance nothing.
            assert (got == plain) == (n is None or options.cfg_scale <= 1), (label, n, options)


def test_priority_policy_starts_urgent_work_before_queued_work(tiny_model, engine_factory):
    """vLLM's priority policy through our engine arguments: two low-priority images run and
    four wait; an urgent one arriving then starts before the four, by the order in which
    requests produced their first token (never by timing)."""
    from engine.conditions import Condition
    from engine.vllm_api import sampling_params

    llm = engine_factory(tiny_model, max_num_seqs=2, scheduling_policy="priority")
    engine = llm.llm_engine
    params = sampling_params(tiny_model, SamplingOptions(cfg_scale=4.0, greedy=True), None)
    for i in range(6):
        engine.add_request(f"low-{i}", Condition(label=i).prompt(tiny_model), params,
                           priority=5)
    started: list[str] = []  # by first token; within a step, in the engine's order
    step_of: dict[str, int] = {}

    def step(number: int) -> None:
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in started:
                started.append(out.request_id)
                step_of[out.request_id] = number

    step(0)
    assert started == ["low-0", "low-1"]  # saturated: the other four wait
    engine.add_request("high", Condition(label=9).prompt(tiny_model), params, priority=-5)
    number = 0
    while engine.has_unfinished_requests():
        number += 1
        step(number)
    assert started == ["low-0", "low-1", "high", "low-2", "low-3", "low-4", "low-5"]
    # The urgent image took the first slot that freed: with the two running images ending
    # in one step, it started in that step, ahead of low-2 and before the rest.
    assert step_of["high"] == step_of["low-2"] < step_of["low-3"]


def test_completion_keeps_the_prefix_and_checks_it(tiny_engine, tiny_model):
    prefix = random_prefix(tiny_model, 40, seed=3)
    options = SamplingOptions(cfg_scale=4.0, greedy=True)
    (grid,), _ = tiny_engine.generate(classes([2]), options, [prefix])
    assert len(grid) == 256 and grid[:40] == prefix
    # An empty prefix is a plain generation.
    assert tiny_engine.generate(classes([2]), options, [[]])[0] == \
        tiny_engine.generate(classes([2]), options)[0]
    for bad, message in [([0] * 256, "at most 255"), ([0, 256], "prefix token 1 is 256"),
                         ([-1], "prefix token 0 is -1")]:
        with pytest.raises(ValueError, match=message):
            tiny_engine.generate(classes([2]), options, [bad])


def test_seeded_sampling_is_reproducible(tiny_engine, tiny_model):
    options = SamplingOptions(cfg_scale=4.0, top_k=100, top_p=0.95, temperature=1.0, seed=1234)
    a, seeds_a = tiny_engine.generate(classes([1, 1, 2]), options)
    b, seeds_b = tiny_engine.generate(classes([1, 1, 2]), options)
    assert a == b and seeds_a == seeds_b == [1234, 1235, 1236]
    assert a[0] != a[1]  # same label, next seed: another image
    c, _ = tiny_engine.generate(classes([3, 3, 2]), options)
    assert c[0] != a[0]  # another label, same seed: another image
    ids = torch.tensor(a + c)
    assert ids.min() >= 0 and ids.max() < tiny_model.gpt.vocab_size


def test_unseeded_sampling_reports_its_seeds(tiny_engine):
    options = SamplingOptions(cfg_scale=2.0, top_k=50)
    tokens, seeds = tiny_engine.generate(classes([4, 4]), options)
    assert len(set(seeds)) == 2
    again, _ = tiny_engine.generate(classes([4, 4]), options.model_copy(update={"seed": seeds[0]}))
    assert again == tokens


def test_ids_stay_in_codebook_at_high_temperature(tiny_engine, tiny_model):
    tokens, _ = tiny_engine.generate(classes(list(range(6))),
                                     SamplingOptions(cfg_scale=8.0, temperature=2.0, top_k=0,
                                                     seed=0))
    ids = torch.tensor(tokens)
    assert ids.max() < tiny_model.gpt.vocab_size
    assert len(ids.unique()) > 50  # really sampled over the codebook


def test_engine_refuses_to_start_without_the_cfg_processor(tiny_model, engine_factory):
    with pytest.raises(Exception, match="CFGLogitsProcessor"):
        engine_factory(tiny_model, logits_processors=[])


def test_guidance_args_validation():
    assert guidance_args(None) == (1.0, -1)
    assert guidance_args({"cfg_scale": 4, "cfg_interval": 10}) == (4.0, 10)
    for bad in ({"cfg_scale": -1}, {"cfg_scale": float("nan")}, {"cfg_scale": "4"},
                {"cfg_interval": -2}, {"cfg_interval": 1.5}):
        with pytest.raises(ValueError):
            guidance_args(bad)


def test_engine_rejects_invalid_guidance(tiny_engine, tiny_model):
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    from engine.vllm_api import sampling_params

    params = sampling_params(tiny_model, SamplingOptions(greedy=True), None)
    params.extra_args = {"cfg_scale": -2.0}
    with pytest.raises(VLLMValidationError, match="cfg_scale"):
        tiny_engine.llm.generate([TokensPrompt(prompt_token_ids=[256])], [params],
                                 use_tqdm=False)
    assert CFG_PROCESSOR.endswith("CFGLogitsProcessor")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_generate_valid_images(tiny_model, engine_factory, dtype):
    """Parity is defined in fp32; half precision must still give whole, valid, deterministic
    images (its greedy tokens may differ from fp32 where margins are tiny)."""
    engine = OfflineGenerator(tiny_model, engine_factory(tiny_model, dtype=dtype,
                                                         max_num_seqs=4))
    options = SamplingOptions(cfg_scale=3.0, greedy=True)
    a, _ = engine.generate(classes([0, 5]), options)
    b, _ = engine.generate(classes([0, 5]), options)
    assert a == b
    ids = torch.tensor(a)
    assert ids.shape == (2, 256) and ids.min() >= 0 and ids.max() < tiny_model.gpt.vocab_size
    fp32 = reference_tokens(tiny_model, [0, 5], options)
    agree = (ids == torch.tensor(fp32)).float().mean().item()
    assert agree > 0.05, agree  # same model, not noise (a random match is ~1/256)


def test_auto_dtype_follows_the_hardware():
    from engine.settings import cpu_has_native_bf16, has_cuda, resolve_dtype

    assert resolve_dtype("float32") == "float32"
    if not has_cuda():
        assert resolve_dtype("auto") == ("bfloat16" if cpu_has_native_bf16() else "float32")
