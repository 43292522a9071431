"""`llamagen` as a user runs it: bad input fails fast with one clear line; generate works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vq_decoder.encoding import read_metadata

from .helpers import assert_one_line_error, run_cli, tiny_config


def test_models_lists_the_zoo():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    for name in ("GPT-B", "GPT-3B", "VQ-16", "VQ-8", "c2i_XXL_384.pt", "t2i_XL_stage2_512.pt"):
        assert name in result.stdout
    assert "110,888,448" in result.stdout


@pytest.mark.parametrize("args,pattern", [
    (["convert", "--gpt-checkpoint", "/nonexistent/c2i.pt", "--gpt-model", "GPT-B",
      "--image-size", "256", "--out", "/tmp/x"], "checkpoint not found"),
    (["convert", "--gpt-checkpoint", "{ckpt}", "--gpt-model", "GPT-Q", "--image-size", "256",
      "--out", "{tmp}/o"], "unknown GPT model 'GPT-Q'"),
    (["convert", "--gpt-checkpoint", "{ckpt}", "--gpt-model", "GPT-B", "--image-size", "256",
      "--out", "{tmp}/o"], "does not match its config"),
    (["generate", "--model", "{model}", "--labels", "99", "--greedy"], "out of range 0..9"),
    (["generate", "--model", "{model}", "--labels", "1", "--cfg-scale", "-1"], "--cfg-scale"),
    (["generate", "--model", "{model}", "--labels", "zebra"], "unknown class 'zebra'"),
    (["generate", "--model", "{tmp}/missing", "--labels", "1"], "not a LlamaGen model"),
    (["generate", "--model", "{model}", "--labels", "1", "--dtype", "int8"], None),
    (["generate", "--model", "{model}", "--labels", "1", "2", "--tokens-out", "{tmp}/t.json",
      "--prefix-tokens", "{tmp}/one.json"], "1 lists for 2 images"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--prefix-tokens", "{tmp}/bad.json"], "prefix token 1 is 300"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--prefix-tokens", "{tmp}/none.json"], "--prefix-tokens"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--negative-prompt", "zebra"], "unknown class 'zebra'"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--negative-prompt", "2", "--cfg-scale", "1"], "give --cfg-scale > 1"),
    (["generate", "--model", "{model}", "--labels", "1", "2", "--tokens-out", "{tmp}/t.json",
      "--negative-prompts", "2"], "1 for 2 images"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--negative-prompt", "2", "--negative-prompts", "3"], "not both"),
    (["generate", "--model", "{model}", "--labels", "1", "--tokens-out", "{tmp}/t.json",
      "--lora", "{tmp}/no-adapter"], "--lora: {tmp}/no-adapter: no such adapter directory"),
    (["serve", "--model", "{model}", "--lora-modules", "dusk={tmp}"], "not a PEFT adapter"),
])
def test_bad_input_exits_with_one_clear_line(tmp_path, tiny_model, args, pattern):
    from model_registry.synthetic import save_gpt_checkpoint

    ckpt = save_gpt_checkpoint(tiny_config(16), tmp_path / "gpt.pt")
    (tmp_path / "one.json").write_text("[[1, 2]]")
    (tmp_path / "bad.json").write_text("[[1, 300]]")
    args = [a.format(ckpt=ckpt, tmp=tmp_path, model=tiny_model.path) for a in args]
    pattern = None if pattern is None else pattern.format(tmp=tmp_path)
    result = run_cli(*args)
    if pattern is None:  # argparse's own usage error
        assert result.returncode == 2 and "invalid choice" in result.stderr
    else:
        assert_one_line_error(result, pattern)


def test_convert_then_generate_tokens_match_reference(tmp_path, tiny_model):
    """The documented path end to end: official files -> convert -> generate --tokens-out."""
    import torch

    from model_registry.generate import generate
    from model_registry.synthetic import save_gpt_checkpoint

    cfg = tiny_config(16)
    ckpt = save_gpt_checkpoint(cfg, tmp_path / "c2i.pt", layout="fsdp", stale_freqs_cis=True,
                               seed=1)
    (tmp_path / "gpt.json").write_text(json.dumps(cfg.to_dict()))
    result = run_cli("convert", "--gpt-checkpoint", str(ckpt), "--gpt-model",
                     str(tmp_path / "gpt.json"), "--image-size", "256", "--out",
                     str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    tokens_out = tmp_path / "tokens.json"
    result = run_cli("generate", "--model", str(tmp_path / "model"), "--labels", "2", "7",
                     "--cfg-scale", "3.0", "--greedy", "--dtype", "float32",
                     "--tokens-out", str(tokens_out))
    assert result.returncode == 0, result.stderr
    tokens = json.loads(tokens_out.read_text())
    ref = tiny_model.load_reference()  # same weights: seed 1, same config
    expected = generate(ref, torch.tensor([2, 7]), cfg_scale=3.0, greedy=True).tolist()
    assert tokens == expected
    # Completion: keep image 0's top 3 rows, redraw the rest as class 5; the output grids
    # include the prefix, in --tokens-out and --out-dir.
    prefixes = [tokens[0][:48], []]
    (tmp_path / "prefix.json").write_text(json.dumps(prefixes))
    result = run_cli("generate", "--model", str(tiny_model.path), "--labels", "5", "7",
                     "--cfg-scale", "3.0", "--greedy", "--dtype", "float32",
                     "--prefix-tokens", str(tmp_path / "prefix.json"),
                     "--tokens-out", str(tokens_out), "--out-dir", str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr
    # A clean start: vLLM's chat-template warmup (no tokenizer here) says nothing.
    assert "Chat template warmup failed" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    completed = json.loads(tokens_out.read_text())
    assert completed[0] == generate(ref, torch.tensor([5]), cfg_scale=3.0, greedy=True,
                                    prefix=torch.tensor([prefixes[0]])).tolist()[0]
    assert completed[1] == expected[1]
    first, second = sorted((tmp_path / "images").iterdir())
    # The completed image records the tokens it was given; the other is a plain generation.
    assert read_metadata(first.read_bytes())["edit"]["kept_tokens"] == 48
    assert "edit" not in read_metadata(second.read_bytes())


def test_fp8_weights_need_a_gpu_and_say_so_before_anything_starts():
    result = run_cli("generate", "--quantization", "fp8", "--labels", "1", timeout=120)
    assert_one_line_error(result, "quantization fp8 needs an NVIDIA GPU")


def test_server_settings_from_env_and_flags(monkeypatch):
    from cli.main import build_parser, model_from_flags
    from server.settings import ServerSettings

    monkeypatch.setenv("LLAMAGEN_MAX_QUEUED_IMAGES", "40")
    monkeypatch.setenv("LLAMAGEN_API_KEY", "from-env")
    monkeypatch.setenv("LLAMAGEN_MODEL", '["/models/a", "/models/b"]')
    args = build_parser().parse_args(["serve", "--port", "9001", "--max-queued-images", "20"])
    settings = model_from_flags(ServerSettings, args)
    assert settings.port == 9001 and settings.max_queued_images == 20  # flag beats env
    assert settings.api_key.get_secret_value() == "from-env"
    assert [str(p) for p in settings.model] == ["/models/a", "/models/b"]
    args = build_parser().parse_args(["serve", "--model", "x", "y", "--api-key", "s3cr3t"])
    settings = model_from_flags(ServerSettings, args)
    assert [str(p) for p in settings.model] == ["x", "y"] and "s3cr3t" not in repr(settings)


def test_serve_help_documents_every_setting():
    from server.settings import ServerSettings

    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout, name


def test_serve_bad_model_fails_fast(tmp_path):
    assert_one_line_error(run_cli("serve", "--model", str(tmp_path)), "not a LlamaGen model")
    assert_one_line_error(run_cli("serve", "--model", str(tmp_path), "--max-queued-images",
                                  "2"), "max_queued_images")


def test_serve_refuses_unreadable_signing_credentials(tmp_path):
    """Bad C2PA keys fail `serve` before any engine starts, in one line."""
    assert_one_line_error(run_cli("serve", "--c2pa-cert", str(tmp_path / "chain.pem"),
                                  "--c2pa-key", str(tmp_path / "key.pem")), "C2PA credentials")
    assert_one_line_error(run_cli("serve", "--c2pa-cert", str(tmp_path / "chain.pem")),
                          "both --c2pa-cert and --c2pa-key")


@pytest.mark.parametrize("lines,pattern", [
    (['{"name": "a", "key": "k1"}', '{"name": "b"}'], "line 2: give exactly one of key"),
    (['# tiers', '', '{"name": "a", "key": "k1"', ], "line 3: not a JSON object"),
    (['{"name": "a", "key": "k1"}', '{"name": "a", "key": "k2"}'], "line 2: the name 'a'"),
    (['{"name": "a", "key": "k1", "images_per_minute": 0}'], "line 1: images_per_minute"),
    (['{"name": "a", "key": "k1", "default_priority": 5, "max_priority": 9}'],
     "line 1: max_priority 9 is less urgent"),
    (['{"name": "a", "key": "k1", "default_priority": 5}'], "needs --scheduling-policy"),
    ([], "no keys"),
])
def test_serve_refuses_a_bad_keys_file_naming_the_line(tmp_path, lines, pattern):
    """A malformed --api-keys-file stops `serve` before any engine starts, in one line that
    names the line and never echoes a key."""
    keys = tmp_path / "keys.jsonl"
    keys.write_text("\n".join(lines) + "\n")
    result = run_cli("serve", "--api-keys-file", str(keys))
    assert_one_line_error(result, pattern)
    assert "k1" not in result.stderr and "k2" not in result.stderr


def test_dev_credentials_command(tmp_path):
    result = run_cli("dev-credentials", "--out", str(tmp_path / "dev"))
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert "UNTRUSTED" in result.stderr  # said once, when they are made
    assert Path(paths["cert"]).is_file() and Path(paths["key"]).is_file()
