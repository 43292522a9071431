"""LoRA adapters in PEFT's format, for the original module names.

An adapter is what `peft` saves for a LlamaGen GPT (the original `gpt.py`, or
`model_registry/gpt.py`, whose names are the same): a directory with `adapter_config.json`
(`peft_type` LORA, `r`, `lora_alpha`, `target_modules`) and `adapter_model.safetensors`
(`base_model.model.layers.N.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)).
Target modules: `attention.wqkv`, `attention.wo`, `feed_forward.w1`, `w2`, `w3`. vLLM serves
them (its LoRA layers; `w1` and `w3` land on the merged `w13`); `check_adapter` refuses
anything vLLM would fail on later, with a message naming what is wrong, before it is loaded.
The reference merges an adapter into its weights with `peft` itself (`merged_reference`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model_registry.configs import GPTConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT target name -> where it sits in a block.
TARGETS = {"wqkv": "attention", "wo": "attention", "w1": "feed_forward", "w2": "feed_forward",
           "w3": "feed_forward"}
KEY = re.compile(r"base_model\.model\.layers\.(\d+)\.(attention|feed_forward)\.(\w+)"
                 r"\.lora_([AB])\.weight")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why (never a traceback)."""


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    sha256: str  # of adapter_model.safetensors: what provenance records

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _shapes(gpt: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target in the base model."""
    d, h = gpt.dim, gpt.ffn_hidden
    return {"wqkv": (d, 3 * d), "wo": (d, d), "w1": (d, h), "w3": (d, h), "w2": (h, d)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise AdapterError(f"{path}: not a PEFT adapter (no {name})")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{path}/{ADAPTER_CONFIG}: not JSON") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}/{ADAPTER_CONFIG}: not a JSON object")
    return config


def check_adapter(path: Path, gpt: GPTConfig, max_rank: int | None = None) -> AdapterInfo:
    """The adapter at `path`, checked against the base model `gpt` (AdapterError when it is
    not PEFT LoRA, uses a feature not served, exceeds `max_rank`, targets another module,
    or has shapes of another base)."""
    path = Path(path)
    config = _config(path)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}, only LORA is served")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} exceeds --max-lora-rank {max_rank}")
    unsupported = [name for name, off in (("use_dora", False), ("use_rslora", False),
                                          ("bias", "none"), ("modules_to_save", None),
                                          ("rank_pattern", {}), ("alpha_pattern", {}))
                   if config.get(name, off) not in (off, None, [], {})]
    if unsupported:
        raise AdapterError(f"{path}: {', '.join(unsupported)} not supported (plain LoRA only)")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: target_modules must list module names")
    names = {t.rsplit(".", 1)[-1] for t in targets}
    unknown = sorted(names - set(TARGETS))
    if unknown:
        raise AdapterError(f"{path}: target module(s) {', '.join(unknown)} not served; LoRA "
                           f"applies to {', '.join(TARGETS)}")
    shapes = _shapes(gpt)
    seen: set[str] = set()
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                match = KEY.fullmatch(key)
                if match is None or TARGETS.get(match[3]) != match[2]:
                    raise AdapterError(f"{path}: unexpected tensor {key[:120]!r}")
                layer, module, side = int(match[1]), match[3], match[4]
                if layer >= gpt.n_layer:
                    raise AdapterError(f"{path}: {key} is for layer {layer}; the base has "
                                       f"{gpt.n_layer}")
                if module not in names:
                    raise AdapterError(f"{path}: {key} is not among target_modules")
                fan_in, fan_out = shapes[module]
                want = (rank, fan_in) if side == "A" else (fan_out, rank)
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    raise AdapterError(f"{path}: {key} is {list(got)}, this base needs "
                                       f"{list(want)} (another base model, or another rank?)")
                seen.add(key)
    except AdapterError:
        raise
    except Exception:
        raise AdapterError(f"{path}/{ADAPTER_WEIGHTS}: not a readable safetensors file") from None
    pairs = {k.removesuffix(".lora_A.weight") for k in seen if k.endswith("lora_A.weight")}
    if not pairs or pairs != {k.removesuffix(".lora_B.weight") for k in seen
                              if k.endswith("lora_B.weight")}:
        raise AdapterError(f"{path}: every module needs both lora_A and lora_B")
    return AdapterInfo(path, rank, float(alpha), tuple(sorted(names)),
                       file_sha256(path / ADAPTER_WEIGHTS))


def merged_reference(reference: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The reference GPT with the adapter merged into its weights, by `peft` itself (the
    parity tests' truth, independent of vLLM's LoRA layers)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(reference, str(path)).merge_and_unload().eval()
