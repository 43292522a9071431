"""Text-to-image: the golden t2i vectors, the original's caption pipeline, and token-exact
parity between the vLLM engine and the reference with captions of very different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from model_registry.configs import ConfigError, GPTConfig
from model_registry.convert import convert
from model_registry.generate import generate
from model_registry.model_dir import ModelDir
from model_registry.synthetic import save_gpt_checkpoint, save_tiny_t5
from model_registry.text_encoder import T5_MAX_LENGTH, clean_caption, left_pad

from .helpers import (
    TINY_T2I,
    assert_one_line_error,
    completion_cases,
    random_prefix,
    reference_t2i_tokens,
    run_cli,
)

# From one caption token (an empty caption is just </s>) to one truncated at 120.
CAPTIONS = ["", "cat", "a red car on a street at night",
            " ".join(["a small dog running on the beach"] * 5),
            " ".join(["two old horses standing near a river under a bright sky"] * 12)]


@pytest.fixture(scope="module")
def golden_t2i(golden: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelDir, dict]:
    model = convert(golden / "t2i_gpt.pt", str(golden / "t2i_gpt.json"),
                    tmp_path_factory.mktemp("golden_t2i") / "model")
    return model, json.loads((golden / "t2i_expected.json").read_text())


@pytest.fixture(scope="module")
def golden_captions(golden: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.load(golden / "t2i_captions.npy")),
            torch.from_numpy(np.load(golden / "t2i_masks.npy")))


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    root = tmp_path_factory.mktemp("tiny_t2i")
    t5 = save_tiny_t5(root / "t5", d_model=TINY_T2I["caption_dim"])
    ckpt = save_gpt_checkpoint(GPTConfig(**TINY_T2I), root / "t2i.pt", seed=3)
    return convert(ckpt, json.dumps(TINY_T2I), root / "model", text_encoder=str(t5))


@pytest.fixture(scope="module")
def tiny_captions(tiny_t2i: ModelDir):
    return tiny_t2i.load_text_encoder().encode(CAPTIONS)


@pytest.fixture(scope="module")
def tiny_t2i_engine(tiny_t2i: ModelDir, engine_factory) -> OfflineGenerator:
    return OfflineGenerator(tiny_t2i, engine_factory(tiny_t2i, max_num_seqs=3))


def test_reference_golden_t2i(golden_t2i, golden_captions):
    model, expected = golden_t2i
    features, masks = golden_captions
    ref = model.load_reference()
    for setting in expected["settings"]:
        tokens = generate(ref, features, emb_masks=masks, cfg_scale=setting["cfg_scale"],
                          cfg_interval=setting["cfg_interval"], greedy=True)
        assert tokens.tolist() == setting["tokens"], setting["cfg_scale"]


def test_engine_golden_t2i(golden_t2i, golden_captions, engine_factory):
    model, expected = golden_t2i
    features, masks = golden_captions
    valid = [f[m.bool()] for f, m in zip(features, masks, strict=True)]
    assert [len(v) for v in valid] == expected["caption_valid_lengths"]
    engine = OfflineGenerator(model, engine_factory(model, max_num_seqs=4))
    for setting in expected["settings"]:
        options = SamplingOptions(cfg_scale=setting["cfg_scale"],
                                  cfg_interval=setting["cfg_interval"], greedy=True)
        tokens, _ = engine.generate(engine.caption_features(valid), options)
        assert tokens == setting["tokens"], setting["cfg_scale"]


def test_captions_are_cleaned_tokenised_and_truncated_as_the_original(tiny_t2i, tiny_captions):
    lengths = [len(c.token_ids) for c in tiny_captions]
    assert lengths[0] == 1 and lengths[1] == 2 and lengths[-1] == T5_MAX_LENGTH
    assert len(set(lengths)) == len(lengths)
    encoder = tiny_t2i.load_text_encoder()
    eos = encoder.tokenizer.eos_token_id
    assert all(c.token_ids[-1] == eos for c in tiny_captions)  # truncation keeps </s> last
    # Truncation drops the tail: the kept tokens are the over-long caption's first 119 words.
    full = encoder.tokenizer(CAPTIONS[-1])["input_ids"]
    assert len(full) > T5_MAX_LENGTH and tiny_captions[-1].token_ids[:-1] == full[:119]
    # A caption's features do not depend on its batch-mates.
    alone = encoder.encode([CAPTIONS[2]])[0].features
    torch.testing.assert_close(alone, tiny_captions[2].features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("text,cleaned", [
    # Expected values were checked against the original language/t5.py cleaning.
    ("A photo of a Cat", "a photo of a cat"),
    ("Hello—World “quoted” #123 www.example.com/page IMG_1234.jpg ... a_b_c_d_e",
     'hello world "quoted" a b c d e'),
    ("<p>A <b>red</b> car &amp; a dog</p>", "a red car a dog"),
    ("  'quoted caption'  ", "quoted caption"),
    ("@user nice 1920x1080 shot", "nice shot"),
    ("free shipping worldwide! click for details", "worldwide!"),
    ("jc6640 and 6640vc231 and j2d1a2a", "and and"),
])
def test_clean_caption(text, cleaned):
    assert clean_caption(text) == cleaned


@pytest.mark.parametrize("cfg_scale", [7.5, 1.0])
def test_engine_matches_reference_with_mixed_caption_lengths(tiny_t2i, tiny_captions,
                                                             tiny_t2i_engine, cfg_scale):
    """Five captions (1 to 120 tokens) in one submission, three running at a time; the same
    caption twice shares its prefix-cached prompt."""
    valid = [c.features for c in tiny_captions] + [tiny_captions[2].features]
    tokens, _ = tiny_t2i_engine.generate(tiny_t2i_engine.caption_features(valid),
                                         SamplingOptions(cfg_scale=cfg_scale, greedy=True))
    assert tokens == reference_t2i_tokens(tiny_t2i, valid, cfg_scale)
    assert tokens[2] == tokens[-1]


def test_completion_parity_in_one_mixed_batch(tiny_t2i, tiny_t2i_engine):
    """Captions of 1, 30 and 120 tokens, each completed from prefixes of 0, one row, half
    and all but one token, guided or not, with a cfg_interval ending inside and after the
    prefix: all in one submission, three running at a time, equal to the reference's."""
    from engine.vllm_api import sampling_params

    g = torch.Generator().manual_seed(5)
    valid = [torch.randn(n, TINY_T2I["caption_dim"], generator=g) for n in (1, 30, 120)]
    conditions = tiny_t2i_engine.caption_features(valid)
    cases = [(c, random_prefix(tiny_t2i, p, seed=k), SamplingOptions(
        cfg_scale=s, cfg_interval=i, greedy=True))
        for k, (p, s, i) in enumerate(completion_cases(8)) for c in range(3)]
    prompts = [conditions[c].prompt(tiny_t2i, prefix, tiny_t2i_engine.null)
               for c, prefix, _ in cases]
    params = [sampling_params(tiny_t2i, opts, None, prefix_len=len(prefix))
              for _, prefix, opts in cases]
    outputs = tiny_t2i_engine.llm.generate(prompts, params, use_tqdm=False)
    for (c, prefix, opts), out in zip(cases, outputs, strict=True):
        expected = reference_t2i_tokens(tiny_t2i, [valid[c]], opts.cfg_scale,
                                        opts.cfg_interval, [prefix])[0]
        assert prefix + list(out.outputs[0].token_ids) == expected, (c, len(prefix), opts)


def test_negative_caption_parity_in_one_mixed_batch(tiny_t2i, tiny_t2i_engine):
    """Negative captions shorter than, longer than and as long as the caption, beside
    captions without one, guided and not and completing prefixes: equal to the reference
    loop with the negative caption in its unconditional half (both halves masked alike)."""
    g = torch.Generator().manual_seed(9)
    dim = TINY_T2I["caption_dim"]
    valid = [torch.randn(n, dim, generator=g) for n in (1, 30, 30, 120, 64)]
    negative = [torch.randn(n, dim, generator=g) if n else None for n in (5, 60, 0, 120, 64)]
    conditions = [c.with_negative(None if n is None else tiny_t2i_engine.caption_features([n])[0])
                  for c, n in zip(tiny_t2i_engine.caption_features(valid), negative, strict=True)]
    for options, prefix_len in [(SamplingOptions(cfg_scale=7.5, greedy=True), 0),
                                (SamplingOptions(cfg_scale=1.0, greedy=True), 0),
                                (SamplingOptions(cfg_scale=4.0, cfg_interval=40, greedy=True), 24)]:
        prefixes = [random_prefix(tiny_t2i, prefix_len, seed) for seed in range(len(valid))]
        tokens, _ = tiny_t2i_engine.generate(conditions, options, prefixes)
        for i, (rows, n, got) in enumerate(zip(valid, negative, tokens, strict=True)):
            kept = [prefixes[i]] if prefix_len else None
            expected = reference_t2i_tokens(tiny_t2i, [rows], options.cfg_scale,
                                            options.cfg_interval, kept,
                                            None if n is None else [n])[0]
            assert got == expected, (i, options)
            plain = reference_t2i_tokens(tiny_t2i, [rows], options.cfg_scale,
                                         options.cfg_interval, kept)[0]
            changed = n is not None and (options.cfg_scale > 1 or len(n) > len(rows))
            assert (got != plain) == changed, (i, options)


def test_parity_under_preemption(tiny_t2i, engine_factory):
    """Long captions and a KV cache for two of them, six running: preempted requests are
    recomputed from their prompt embeddings at the same per-request positions."""
    from vllm.v1.metrics.reader import Counter

    from engine.settings import EngineSettings
    from engine.vllm_api import cpu_kv_cache_bytes

    g = torch.Generator().manual_seed(11)
    valid = [torch.randn(n, TINY_T2I["caption_dim"], generator=g)
             for n in (70, 90, 110, 120, 100, 80)]
    kv_gib = cpu_kv_cache_bytes(tiny_t2i, EngineSettings(max_num_seqs=2), "float32") / 2**30
    llm = engine_factory(tiny_t2i, max_num_seqs=6, kv_cache_gib=kv_gib,
                         disable_log_stats=False, enable_prefix_caching=False)
    engine = OfflineGenerator(tiny_t2i, llm)
    tokens, _ = engine.generate(engine.caption_features(valid),
                                SamplingOptions(cfg_scale=4.0, greedy=True))
    assert tokens == reference_t2i_tokens(tiny_t2i, valid, 4.0)
    # Completions from a 20-token prefix, guidance ending at image token 31.
    prefixes = [random_prefix(tiny_t2i, 20, seed) for seed in range(len(valid))]
    completed, _ = engine.generate(engine.caption_features(valid),
                                   SamplingOptions(cfg_scale=4.0, cfg_interval=30, greedy=True),
                                   prefixes)
    assert completed == reference_t2i_tokens(tiny_t2i, valid, 4.0, 30, prefixes)
    preemptions = sum(m.value for m in llm.get_metrics()
                      if m.name == "vllm:num_preemptions" and isinstance(m, Counter))
    assert preemptions > 0


def test_padding_is_invisible_to_the_image(tiny_t2i, tiny_captions):
    """The reference with masks differs from one that lets image tokens see padded slots:
    the masking is what the parity above pins down."""
    valid = [tiny_captions[2].features]
    features, masks = left_pad(valid)
    ref = tiny_t2i.load_reference()
    masked = generate(ref, features, emb_masks=masks, cfg_scale=7.5, greedy=True)
    unmasked = generate(ref, features, cfg_scale=7.5, greedy=True)
    assert (masked != unmasked).any()


def test_convert_records_the_text_encoder_and_per_request_positions(tiny_t2i, tmp_path):
    config = json.loads((tiny_t2i.path / "config.json").read_text())
    assert config["mrope_section"] == [0, 16, 16]
    assert config["llamagen"]["text_encoder"]["max_length"] == 120
    assert tiny_t2i.is_t2i and tiny_t2i.text_encoder is not None
    ckpt = tmp_path / "t2i.pt"
    save_gpt_checkpoint(GPTConfig(**TINY_T2I), ckpt)
    wrong = save_tiny_t5(tmp_path / "t5_32", d_model=32)
    with pytest.raises(ConfigError, match="caption_dim is 64"):
        convert(ckpt, json.dumps(TINY_T2I), tmp_path / "out", text_encoder=str(wrong))
    with pytest.raises(ConfigError, match="class names"):
        convert(ckpt, json.dumps(TINY_T2I), tmp_path / "out", class_names=ckpt)


def test_convert_takes_the_task_of_a_zoo_name_from_the_checkpoint(tmp_path):
    """`--gpt-model GPT-XL` fits c2i and t2i files: the caption embedder's keys decide, so a
    t2i file is checked against the t2i config (here: a tiny file, so the shapes differ)."""
    from model_registry.checkpoint import CheckpointError

    ckpt = save_gpt_checkpoint(GPTConfig(**TINY_T2I), tmp_path / "t2i.pt")
    with pytest.raises(CheckpointError) as e:
        convert(ckpt, "GPT-XL", tmp_path / "out", image_size=256)
    assert "cls_embedding.cap_proj.fc1.weight: checkpoint (128, 64) vs config (1280, 2048)" \
        in str(e.value)
    assert "embedding_table" not in str(e.value)


def test_convert_fetches_a_hub_text_encoder_or_says_why_not(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # Offline with an empty cache, whatever the machine (huggingface_hub reads its
    # environment once, at import).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    ckpt = save_gpt_checkpoint(GPTConfig(**TINY_T2I), tmp_path / "t2i.pt")
    with pytest.raises(ConfigError, match="cannot get text encoder 'google/flan-t5-xl'"):
        convert(ckpt, json.dumps(TINY_T2I), tmp_path / "out", text_encoder="google/flan-t5-xl")



def test_cli_convert_then_generate_prompts(tmp_path, tiny_t2i):
    """`llamagen convert --text-encoder` then `llamagen generate --prompts`, end to end."""
    ckpt = save_gpt_checkpoint(GPTConfig(**TINY_T2I), tmp_path / "t2i.pt", seed=3)
    (tmp_path / "gpt.json").write_text(json.dumps(TINY_T2I))
    t5 = tiny_t2i.text_encoder["name_or_path"]
    result = run_cli("convert", "--gpt-checkpoint", str(ckpt), "--gpt-model",
                     str(tmp_path / "gpt.json"), "--text-encoder", t5,
                     "--out", str(tmp_path / "model"))
    assert result.returncode == 0 and "text encoder" in result.stdout, result.stderr
    prompts = ["a dog on the beach", "two birds flying over the sea at night"]
    tokens_out = tmp_path / "tokens.json"
    result = run_cli("generate", "--model", str(tmp_path / "model"), "--prompts", *prompts,
                     "--cfg-scale", "7.5", "--greedy", "--dtype", "float32",
                     "--tokens-out", str(tokens_out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["prompts"] == prompts
    valid = [c.features for c in tiny_t2i.load_text_encoder().encode(prompts)]
    assert json.loads(tokens_out.read_text()) == reference_t2i_tokens(tiny_t2i, valid, 7.5)
    result = run_cli("generate", "--model", str(tmp_path / "model"), "--labels", "3",
                     "--tokens-out", str(tokens_out))
    assert_one_line_error(result, "text-conditional: give --prompts")


def test_caption_service_batches_requests_and_keeps_each_together(tiny_t2i):
    """Concurrent requests share T5 batches; each gets its own captions back, in order, equal
    to encoding and projecting them alone; a request's prompts never split across batches."""
    import asyncio

    from engine.captions import CaptionService

    encoder = tiny_t2i.load_text_encoder()
    projection = tiny_t2i.caption_projection()
    requests = [["a cat"], ["a red car", "a dog", "the moon"], ["two birds"], ["sea", "sky"]]
    batches: list[int] = []

    async def run():
        service = CaptionService(encoder, projection, max_batch_size=4, max_wait_s=0.2,
                                 on_batch=lambda n, _: batches.append(n))
        await service.start()
        try:
            return await asyncio.gather(*(service.encode(r) for r in requests))
        finally:
            await service.stop()

    results = asyncio.run(run())
    assert batches == [4, 3]  # [1 + 3], then [1 + 2]: the fourth request did not fit
    for texts, conditions in zip(requests, results, strict=True):
        assert [c.caption for c in conditions] == texts
        for text, condition in zip(texts, conditions, strict=True):
            alone = projection(encoder.encode([text])[0].features)
            torch.testing.assert_close(condition.embeds, alone, rtol=0, atol=1e-5)


def test_caption_service_stop_fails_waiting_requests(tiny_t2i):
    import asyncio

    from engine.captions import CaptionService

    async def run():
        service = CaptionService(tiny_t2i.load_text_encoder(), tiny_t2i.caption_projection(),
                                 max_batch_size=8, max_wait_s=30)
        await service.start()
        pending = asyncio.ensure_future(service.encode(["a cat"]))
        await asyncio.sleep(0.1)  # collected, waiting for the batch to fill
        await service.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await asyncio.wait_for(pending, timeout=5)

    asyncio.run(run())
