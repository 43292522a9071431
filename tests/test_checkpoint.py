"""Official checkpoint layouts load strictly; mismatches are clear errors; the zoo is right."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model_registry.checkpoint import CheckpointError, hub_download, read_checkpoint, sha256_file
from model_registry.configs import ConfigError, resolve_gpt_config
from model_registry.convert import convert
from model_registry.gpt import Transformer, precompute_freqs_cis_2d
from model_registry.model_dir import load_model_dir
from model_registry.synthetic import random_gpt_state_dict, save_gpt_checkpoint

from .helpers import tiny_config


@pytest.mark.parametrize("layout,stale", [("ddp", False), ("ddp", True), ("fsdp", False),
                                          ("fsdp", True)])
def test_official_layouts_convert_strictly(tmp_path, layout, stale):
    cfg = tiny_config(16)
    sd = random_gpt_state_dict(cfg, seed=3)
    ckpt = save_gpt_checkpoint(cfg, tmp_path / "gpt.pt", layout=layout, stale_freqs_cis=stale,
                               state_dict=sd)
    raw, found = read_checkpoint(ckpt)
    assert found == ("model" if layout == "ddp" else "bare")
    assert ("freqs_cis" in raw) == stale
    model = convert(ckpt, json.dumps(cfg.to_dict()), tmp_path / "out")
    stored = load_file(model.path / "model.safetensors")
    assert set(stored) == set(sd)  # freqs_cis dropped, nothing else
    for k, v in sd.items():
        assert torch.equal(stored[k], v), k
    assert model.metadata["gpt"]["sha256"] == sha256_file(ckpt)
    assert model.metadata["gpt"]["layout"] == found
    # The random head is really random (the original zero-initialises it).
    assert stored["output.weight"].abs().sum() > 0
    ref = model.load_reference()
    assert torch.equal(ref.output.weight, sd["output.weight"])


def test_state_dict_wrappers(tmp_path):
    cfg = tiny_config(16)
    sd = random_gpt_state_dict(cfg)
    for key in ("module", "state_dict"):
        torch.save({key: sd}, tmp_path / f"{key}.pt")
        assert read_checkpoint(tmp_path / f"{key}.pt")[1] == key


def _convert_sd(tmp_path, sd, cfg):
    torch.save({"model": sd}, tmp_path / "bad.pt")
    return convert(tmp_path / "bad.pt", json.dumps(cfg.to_dict()), tmp_path / "out")


def test_missing_key_is_an_error(tmp_path):
    cfg = tiny_config(16)
    sd = random_gpt_state_dict(cfg)
    del sd["layers.1.feed_forward.w3.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.feed_forward\.w3"):
        _convert_sd(tmp_path, sd, cfg)
    assert not (tmp_path / "out").exists()


def test_unexpected_key_is_an_error(tmp_path):
    cfg = tiny_config(16)
    sd = random_gpt_state_dict(cfg)
    sd["layers.2.attention.wqkv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key.*layers\.2\.attention\.wqkv"):
        _convert_sd(tmp_path, sd, cfg)


def test_shape_mismatch_is_an_error(tmp_path):
    sd = random_gpt_state_dict(tiny_config(16, dim=192, n_head=3))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        _convert_sd(tmp_path, sd, tiny_config(16))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a LlamaGen model directory"):
        load_model_dir(tmp_path)


def test_hub_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"c2i_B_256\.pt"):
        hub_download("FoundationVision/LlamaGen", "c2i_B_256.pt", cache_dir=tmp_path)


# Parameter counts measured on the original classes (spec section 1.2).
@pytest.mark.parametrize("name,size,params", [
    ("GPT-B", 256, 110_888_448), ("GPT-L", 256, 342_910_976), ("GPT-XL", 384, 774_699_520),
    ("GPT-XXL", 384, 1_410_972_672), ("GPT-3B", 384, 3_096_659_200),
])
def test_zoo_parameter_counts(name, size, params):
    cfg = resolve_gpt_config(name, image_size=size)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert cfg.block_size == (size // 16) ** 2


def test_zoo_config_errors():
    with pytest.raises(ConfigError, match="unknown GPT model"):
        resolve_gpt_config("GPT-Q", image_size=256)
    with pytest.raises(ConfigError, match="unknown GPT config field"):
        resolve_gpt_config('{"dim": 64, "n_layers": 2}')
    with pytest.raises(ConfigError, match="needs an image size"):
        resolve_gpt_config("GPT-B")


def test_golden_checkpoint_rope_table_matches_ours(golden):
    """The golden c2i file carries the original's own (stale) 2D RoPE table."""
    raw, _ = read_checkpoint(golden / "c2i_gpt.pt")
    cfg = resolve_gpt_config(golden / "c2i_gpt.json")
    ours = precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base,
                                   cfg.cls_token_num)
    torch.testing.assert_close(ours, raw["freqs_cis"], rtol=0, atol=1e-6)
    assert ours[: cfg.cls_token_num].abs().max() == 0  # condition rows: cos = sin = 0
