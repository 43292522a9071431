"""LoRA adapters in PEFT's format: vLLM's multi-LoRA batching through our model equals the
reference with the adapter merged into its weights by peft, token for token (c2i and t2i,
guided and not, base and two adapters in one batch, completions, preemption); bad adapters
are refused before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import offline_adapter
from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from model_registry.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, check_adapter
from model_registry.synthetic import save_lora_adapter

from .helpers import (
    TINY_T2I,
    classes,
    make_model_dir,
    random_prefix,
    reference_t2i_tokens,
    reference_tokens,
    tiny_config,
)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Two adapters of the tiny c2i model: rank 4 on every target, rank 8 on two."""
    root = tmp_path_factory.mktemp("adapters")
    return (save_lora_adapter(tiny_model, root / "style-a", rank=4, seed=1),
            save_lora_adapter(tiny_model, root / "style-b", rank=8, seed=2,
                              targets=("wqkv", "w2")))


@pytest.fixture(scope="module")
def lora_engine(tiny_model, engine_factory):
    return OfflineGenerator(tiny_model, engine_factory(tiny_model, max_num_seqs=6,
                                                       enable_lora=True, max_lora_rank=8))


def test_base_and_two_adapters_in_one_batch_equal_the_merged_reference(
        tiny_model, adapters, lora_engine):
    """Six images, base and both adapters interleaved, in one submission: guided, unguided
    and completing a prefix with guidance ending inside it."""
    a, b = (offline_adapter(tiny_model, path, 8) for path in adapters)
    labels, which = [0, 1, 2, 3, 4, 5], [None, a, b, None, a, b]
    for options, prefix_len in [(SamplingOptions(cfg_scale=4.0, greedy=True), 0),
                                (SamplingOptions(cfg_scale=1.0, greedy=True), 0),
                                (SamplingOptions(cfg_scale=3.0, cfg_interval=40, greedy=True), 64)]:
        prefixes = [random_prefix(tiny_model, prefix_len, seed) for seed in labels]
        tokens, _ = lora_engine.generate(classes(labels), options, prefixes, which)
        for label, adapter, prefix, got in zip(labels, which, prefixes, tokens, strict=True):
            kept = [prefix] if prefix_len else None
            path = None if adapter is None else adapter.info.path
            assert got == reference_tokens(tiny_model, [label], options, kept,
                                           adapter=path)[0], (label, path, options)
            if adapter is not None:  # the adapter matters
                assert got != reference_tokens(tiny_model, [label], options, kept)[0]


def test_seeded_sampling_with_an_adapter_is_reproducible(tiny_model, adapters, lora_engine):
    a = offline_adapter(tiny_model, adapters[0], 8)
    options = SamplingOptions(cfg_scale=4.0, seed=7)
    first, seeds = lora_engine.generate(classes([3, 3]), options, adapters=a)
    again, _ = lora_engine.generate(classes([3, 3]), options, adapters=a)
    base, _ = lora_engine.generate(classes([3, 3]), options)
    assert first == again and seeds == [7, 8]
    assert first != base


def test_parity_with_adapters_under_preemption(tiny_model, adapters, engine_factory):
    """A KV cache for two whole images, six running, base and adapters mixed: preempted
    requests are recomputed with their adapter."""
    from vllm.v1.metrics.reader import Counter

    from engine.settings import EngineSettings
    from engine.vllm_api import cpu_kv_cache_bytes

    kv_gib = cpu_kv_cache_bytes(tiny_model, EngineSettings(max_num_seqs=2), "float32") / 2**30
    llm = engine_factory(tiny_model, max_num_seqs=6, kv_cache_gib=kv_gib, enable_lora=True,
                         max_lora_rank=8, disable_log_stats=False, enable_prefix_caching=False)
    engine = OfflineGenerator(tiny_model, llm)
    a, b = (offline_adapter(tiny_model, path, 8) for path in adapters)
    labels, which = [0, 1, 2, 3, 4, 5], [a, b, None, b, a, None]
    options = SamplingOptions(cfg_scale=3.0, greedy=True)
    tokens, _ = engine.generate(classes(labels), options, adapters=which)
    for label, adapter, got in zip(labels, which, tokens, strict=True):
        path = None if adapter is None else adapter.info.path
        assert got == reference_tokens(tiny_model, [label], options, adapter=path)[0]
    preemptions = sum(m.value for m in llm.get_metrics()
                      if m.name == "vllm:num_preemptions" and isinstance(m, Counter))
    assert preemptions > 0


def test_t2i_adapters_equal_the_merged_reference(t2i_served_model, engine_factory,
                                                 tmp_path_factory):
    """Captions of 1, 30 and 120 rows, base and two adapters mixed, guided and not."""
    model = t2i_served_model
    root = tmp_path_factory.mktemp("t2i-adapters")
    paths = (save_lora_adapter(model, root / "a", rank=4, seed=3),
             save_lora_adapter(model, root / "b", rank=2, seed=4, targets=("wo", "w1", "w3")))
    engine = OfflineGenerator(model, engine_factory(model, max_num_seqs=6, enable_lora=True,
                                                    max_lora_rank=8))
    a, b = (offline_adapter(model, path, 8) for path in paths)
    g = torch.Generator().manual_seed(5)
    valid = [torch.randn(n, TINY_T2I["caption_dim"], generator=g) for n in (1, 30, 120)] * 2
    which = [a, None, b, b, a, None]
    for cfg in (7.5, 1.0):
        tokens, _ = engine.generate(engine.caption_features(valid),
                                    SamplingOptions(cfg_scale=cfg, greedy=True), adapters=which)
        for rows, adapter, got in zip(valid, which, tokens, strict=True):
            path = None if adapter is None else adapter.info.path
            assert got == reference_t2i_tokens(model, [rows], cfg, adapter=path)[0], (cfg, path)


def _copy(path, tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (out / file).write_bytes((path / file).read_bytes())
    return out


def test_bad_adapters_are_refused_saying_why(tiny_model, adapters, tmp_path):
    good = adapters[0]
    info = check_adapter(good, tiny_model.gpt, 8)
    assert (info.rank, info.alpha, info.targets) == (4, 8.0, ("w1", "w2", "w3", "wo", "wqkv"))
    assert len(info.sha256) == 64

    def refused(path, pattern, max_rank=8, gpt=tiny_model.gpt):
        with pytest.raises(AdapterError, match=pattern):
            check_adapter(path, gpt, max_rank)

    refused(tmp_path / "missing", "no such adapter directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not a PEFT adapter")
    refused(adapters[1], "rank 8 exceeds --max-lora-rank 4", max_rank=4)
    not_lora = _copy(good, tmp_path, "ia3")
    config = json.loads((not_lora / ADAPTER_CONFIG).read_text())
    (not_lora / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    refused(not_lora, "only LORA is served")
    head = _copy(good, tmp_path, "head")
    (head / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["output"]}))
    refused(head, "output not served")
    dora = _copy(good, tmp_path, "dora")
    (dora / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    refused(dora, "use_dora")
    # An adapter made for a wider base.
    wide = make_model_dir(tmp_path / "wide", tiny_config(16, dim=192, n_head=3), seed=3)
    refused(save_lora_adapter(wide, tmp_path / "wide-lora"), "another base model")
    # A tensor the config does not announce, and one half of a pair missing.
    tensors = load_file(good / ADAPTER_WEIGHTS)
    extra = _copy(good, tmp_path, "extra")
    save_file({**tensors, "base_model.model.output.lora_A.weight": torch.zeros(4, 128)},
              extra / ADAPTER_WEIGHTS)
    refused(extra, "unexpected tensor")
    half = _copy(good, tmp_path, "half")
    save_file({k: v for k, v in tensors.items() if "layers.1.attention.wo.lora_B" not in k},
              half / ADAPTER_WEIGHTS)
    refused(half, "both lora_A and lora_B")
    broken = _copy(good, tmp_path, "broken")
    (broken / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    refused(broken, "not a readable safetensors file")


def test_lora_modules_name_their_base():
    """--lora-modules: NAME=PATH with one model; with several, JSON naming the base by any
    of its served names; bad entries say why."""
    from server.settings import ServerSettings

    one = {"demo": ["demo", "dall-e-2"]}
    settings = ServerSettings(lora_modules=["night=/a/night"])
    assert settings.enable_lora
    assert {m: [(n, str(p)) for n, p in v] for m, v in settings.adapters(one).items()} == {
        "demo": [("night", "/a/night")]}
    two = {"demo": ["demo"], "cats": ["cats", "gpt-image-1"]}
    entry = json.dumps({"name": "tabby", "path": "/a/t", "base_model_name": "gpt-image-1"})
    assert ServerSettings(lora_modules=[entry]).adapters(two)["cats"][0][0] == "tabby"
    for models, modules, pattern in [
            (two, ["night=/a"], "with several models"),
            (one, ["night"], "NAME=PATH"),
            (two, [json.dumps({"name": "x", "path": "/a", "base_model_name": "z"})],
             "'z' is not served"),
            (one, ["dall-e-2=/a"], "already a model's"),
            (one, ['{"name": "x"}'], "needs \"name\" and \"path\"")]:
        with pytest.raises(ValueError, match=pattern):
            ServerSettings(lora_modules=modules).adapters(models)


def test_generate_with_lora_writes_the_adapters_tokens_and_provenance(tiny_model, adapters,
                                                                      tmp_path):
    """`llamagen generate --lora DIR`: the merged reference's tokens, the adapter in every
    image's provenance."""
    from vq_decoder.encoding import read_metadata

    from .helpers import run_cli

    result = run_cli("generate", "--model", str(tiny_model.path), "--labels", "2", "6",
                     "--greedy", "--cfg-scale", "3", "--lora", str(adapters[1]),
                     "--max-lora-rank", "8", "--dtype", "float32",
                     "--tokens-out", str(tmp_path / "t.json"),
                     "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    tokens = json.loads((tmp_path / "t.json").read_text())
    assert tokens == reference_tokens(tiny_model, [2, 6], SamplingOptions(cfg_scale=3.0,
                                                                          greedy=True),
                                      adapter=adapters[1])
    for path in json.loads(result.stdout.strip().splitlines()[-1])["images"]:
        record = read_metadata(Path(path).read_bytes())
        assert record["lora"]["name"] == "style-b" and record["lora"]["rank"] == 8
