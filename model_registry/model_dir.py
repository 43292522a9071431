"""A self-describing LlamaGen model directory, and the one loader that reads it.

    DIR/config.json            vLLM/HF config (architectures: LlamaGenForCausalLM) with a
                               "llamagen" section: the GPT ModelArgs, the image size and,
                               for t2i, the text encoder (a local path or hub name)
    DIR/model.safetensors      GPT weights under the official key names
    DIR/vq/config.json         VQ tokenizer config (original field names + ch, num_res_blocks)
    DIR/vq/model.safetensors   VQ weights under the official key names
    DIR/classes.txt            optional `id, name` lines replacing the ImageNet class names
    DIR/llamagen.json          provenance: source files and their sha256, software version

The VQ weights live in a subdirectory because vLLM loads every top-level *.safetensors file.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model_registry.checkpoint import CheckpointError, strict_state_dict
from model_registry.configs import GPTConfig
from model_registry.gpt import MLP, Transformer, precompute_freqs_cis_2d
from model_registry.text_encoder import TextEncoder
from vq_decoder.decoder import VQDecoder
from vq_decoder.encoder import VQEncoder
from vq_decoder.vq_model import VQConfig, VQModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VQ_DIR = "vq"
CLASSES_FILE = "classes.txt"
METADATA_FILE = "llamagen.json"


def parse_class_names(text: str) -> list[str]:
    """`id, name` lines (ids 0..n-1 in order) -> names."""
    names = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        idx, sep, name = line.partition(",")
        if not sep or not idx.strip().isdigit() or int(idx) != len(names) or not name.strip():
            raise ValueError(f"class names line {lineno}: expected '{len(names)}, <name>'")
        names.append(name.strip())
    return names


def imagenet_class_names() -> list[str]:
    text = resources.files("model_registry").joinpath("data/imagenet_classes.txt").read_text()
    return parse_class_names(text)


@dataclass
class ModelDir:
    path: Path
    gpt: GPTConfig
    image_size: int
    vq: VQConfig | None
    metadata: dict[str, Any] = field(default_factory=dict)
    # t2i: {"name_or_path", "max_length", "caption_dim"}; None for c2i, or t2i without one.
    text_encoder: dict[str, Any] | None = None

    @property
    def is_t2i(self) -> bool:
        return self.gpt.model_type == "t2i"

    @property
    def name(self) -> str:
        return self.metadata.get("name") or self.path.name

    @property
    def grid_size(self) -> int:
        return self.gpt.grid_size

    @property
    def max_model_len(self) -> int:
        return self.gpt.cls_token_num + self.gpt.block_size

    @property
    def gpt_sha256(self) -> str:
        return self.metadata.get("gpt", {}).get("sha256", "")

    @cached_property
    def class_names(self) -> list[str]:
        """The model's own names if it ships them, ImageNet's for 1000 classes, else ids."""
        own = self.path / CLASSES_FILE
        if own.is_file():
            return parse_class_names(own.read_text())
        if self.gpt.num_classes == 1000:
            return imagenet_class_names()
        return [str(i) for i in range(self.gpt.num_classes)]

    def resolve_label(self, text: str | int) -> int:
        """A class id ("207", 207) or a class name ("golden retriever", any case) -> id.

        Raises ValueError naming the valid range, the ids of an ambiguous name, or the
        closest names to an unknown one."""
        n = self.gpt.num_classes
        if isinstance(text, int):
            if not 0 <= text < n:
                # Not printed when huge: Python refuses to print integers of 4300+ digits.
                shown = str(text) if abs(text) < 10**40 else "of over 40 digits"
                raise ValueError(f"class id {shown} out of range 0..{n - 1}")
            return text
        digits = text.strip()
        if digits.isascii() and digits.isdigit():
            if len(digits) > 40 or not 0 <= int(digits) < n:
                shown = digits if len(digits) <= 40 else "of over 40 digits"
                raise ValueError(f"class id {shown} out of range 0..{n - 1}")
            return int(digits)
        key = " ".join(str(text).lower().split())
        ids = self._ids_by_name.get(key)
        if ids is None:
            close = difflib.get_close_matches(key, list(self._ids_by_name), n=5, cutoff=0.6)
            hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
            raise ValueError(f"unknown class {str(text)[:100]!r}{hint}")
        if len(ids) > 1:
            raise ValueError(f"class name {str(text)!r} is ambiguous: use one of the ids "
                             f"{', '.join(map(str, ids))}")
        return ids[0]

    @cached_property
    def _ids_by_name(self) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = {}
        for i, name in enumerate(self.class_names):
            ids.setdefault(" ".join(name.lower().split()), []).append(i)
        return ids

    def gpt_state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / WEIGHTS_FILE)

    def vq_state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / VQ_DIR / WEIGHTS_FILE)

    def load_reference(self, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> Transformer:
        """The plain-PyTorch GPT with this directory's weights, in eval mode."""
        with torch.device("meta"):
            model = Transformer(self.gpt)
        sd = strict_state_dict(self.gpt_state_dict(), model, f"{self.path / WEIGHTS_FILE}")
        model.load_state_dict(sd, assign=True)
        # Built on the meta device to skip random init; the RoPE table is no weight: make it.
        model.freqs_cis = precompute_freqs_cis_2d(self.gpt.grid_size, self.gpt.head_dim,
                                                  self.gpt.rope_base, self.gpt.cls_token_num)
        return model.to(device=device, dtype=dtype).eval()

    def load_vq(self, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> VQModel:
        """The whole tokenizer (encoder too), in eval mode."""
        assert self.vq is not None
        with torch.device("meta"):
            model = VQModel(self.vq)
        model.load_state_dict(self._checked_vq_state_dict(), assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def caption_projection(self, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> MLP:
        """t2i `cls_embedding.cap_proj`: T5 features -> condition embeddings. The front-end
        applies it, so the engine receives each caption as prompt embeddings."""
        assert self.is_t2i
        prefix = "cls_embedding.cap_proj."
        # Two small tensors: read them alone, not the whole GPT (3 GB for GPT-XL).
        with safe_open(self.path / WEIGHTS_FILE, framework="pt") as f:
            names = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (no __iter__)
            sd = {k.removeprefix(prefix): f.get_tensor(k) for k in names}
        with torch.device("meta"):
            mlp = MLP(self.gpt.caption_dim, self.gpt.dim, self.gpt.dim)
        mlp.load_state_dict(sd, assign=True)
        return mlp.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def null_caption(self) -> torch.Tensor:
        """t2i: the learned null caption (`uncond_embedding`, 120 x caption_dim) that the
        unconditional stream sees."""
        assert self.is_t2i
        with safe_open(self.path / WEIGHTS_FILE, framework="pt") as f:
            return f.get_tensor("cls_embedding.uncond_embedding")

    def load_text_encoder(self, **kwargs: Any) -> TextEncoder:
        """The t2i caption encoder this model was converted with (kwargs: device, dtype)."""
        if self.text_encoder is None:
            raise CheckpointError(f"model directory {self.path} has no text encoder "
                                  "(convert it with --text-encoder)")
        return TextEncoder.from_section(self.text_encoder, **kwargs)

    def vq_decoder(self, **kwargs: Any) -> VQDecoder:
        """The serving decoder (kwargs: device, dtype, compile, channels_last)."""
        assert self.vq is not None
        return VQDecoder(self.vq, self._checked_vq_state_dict(), **kwargs)

    def vq_encoder(self, **kwargs: Any) -> VQEncoder:
        """The encode half (kwargs: device), strictly from the directory's VQ weights."""
        return VQEncoder(self._vq_config(), self._checked_vq_state_dict(), **kwargs)

    def _vq_config(self) -> VQConfig:
        if self.vq is None:
            raise CheckpointError(f"model directory {self.path} has no VQ tokenizer")
        return self.vq

    def _checked_vq_state_dict(self) -> dict[str, torch.Tensor]:
        if self.vq is None:
            raise CheckpointError(f"model directory {self.path} has no VQ tokenizer")
        with torch.device("meta"):
            shapes = VQModel(self.vq)
        return strict_state_dict(self.vq_state_dict(), shapes, f"{self.path / VQ_DIR}")


def load_model_dir(path: str | Path) -> ModelDir:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"not a LlamaGen model directory (no {CONFIG_FILE}): {path}")
    try:
        config = json.loads(config_file.read_text())
        section = config["llamagen"]
        gpt = GPTConfig.from_dict(section["gpt"])
        image_size = int(section["image_size"])
        text_encoder = section.get("text_encoder")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not a LlamaGen config: {e}") from None
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"model directory {path} has no {WEIGHTS_FILE}")
    vq = None
    vq_config = path / VQ_DIR / CONFIG_FILE
    if vq_config.is_file():
        vq = VQConfig.from_dict(json.loads(vq_config.read_text()))
    metadata_file = path / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    return ModelDir(path=path, gpt=gpt, image_size=image_size, vq=vq, metadata=metadata,
                    text_encoder=text_encoder)
