"""Official LlamaGen checkpoint files: layouts, strict key checks, hashing and the hub cache."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Layouts the original samplers accept, in the order they look for them.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Not weights: a stale 2D RoPE table some official GPT files carry, and KV-cache buffers that a
# state_dict taken after generation holds.
IGNORED_SUFFIXES = ("freqs_cis", ".kv_cache.k_cache", ".kv_cache.v_cache")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or does not match its config."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load an official checkpoint -> (state dict, layout).

    Layouts: `{"model": sd, ...}` (DDP training, VQ files), `{"module": sd}` (DeepSpeed),
    `{"state_dict": sd}`, or the bare state dict (FSDP `consolidated.pth`, XXL and 3B).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # DDP files also store the training `args` (an argparse.Namespace); allow only that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return dict(ckpt[key]), key
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), "bare"
    raise CheckpointError(f"{path}: no state dict found (keys: {sorted(ckpt)[:8]})")


def strict_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, what: str
                      ) -> dict[str, torch.Tensor]:
    """The state dict with ignorable entries dropped, after checking it matches `model` exactly
    (same keys, same shapes); a mismatch raises CheckpointError naming what differs."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {expected[k]}"
             for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_head(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_head(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_head(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not match its config: " + "; ".join(problems))
    return sd


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def hub_download(repo_id: str, filename: str, cache_dir: str | Path | None = None) -> Path:
    """A released file from the Hugging Face hub cache, downloading it if the network allows.

    With HF_HUB_OFFLINE=1 only the local cache is used."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir))
    except Exception as e:
        raise CheckpointError(
            f"cannot get {filename} from {repo_id} (not in the hub cache and no network?): "
            f"{type(e).__name__}: {e}") from None
