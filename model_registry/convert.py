"""Official LlamaGen checkpoints -> a self-describing model directory that vLLM loads."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_registry.checkpoint import (
    CheckpointError,
    read_checkpoint,
    sha256_file,
    strict_state_dict,
)
from model_registry.configs import (
    ConfigError,
    resolve_gpt_config,
    resolve_vq_config,
)
from model_registry.gpt import Transformer
from model_registry.model_dir import (
    CLASSES_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    VQ_DIR,
    WEIGHTS_FILE,
    ModelDir,
    load_model_dir,
    parse_class_names,
)
from model_registry.plugin import vllm_config
from model_registry.text_encoder import T5_MAX_LENGTH, text_encoder_section
from vq_decoder.vq_model import VQConfig, VQModel


@cache  # read once: every image's provenance names it
def software_version() -> str:
    try:
        return version("llamagen-serve")
    except PackageNotFoundError:
        return "unknown"


def _config_source(spec: str) -> str:
    """How the config was given: a zoo name, a JSON file's name, or inline JSON."""
    text = str(spec)
    if text.lstrip().startswith("{"):
        return "inline JSON"
    return Path(text).name


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage (mmap-loaded and sliced tensors).
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def convert(gpt_checkpoint: str | Path, gpt_model: str, out_dir: str | Path, *,
            image_size: int | None = None, vq_checkpoint: str | Path | None = None,
            vq_model: str | None = None, class_names: str | Path | None = None,
            text_encoder: str | None = None, name: str | None = None,
            overwrite: bool = False) -> ModelDir:
    """Check the official files strictly against their configs and write the model directory.

    t2i models record `text_encoder` (a local path or hub name of the T5 encoder, FLAN-T5-XL
    for the released ones); without one the directory generates from caption features only."""
    vq_cfg: VQConfig | None = None
    if vq_checkpoint is not None:
        vq_cfg = resolve_vq_config(vq_model or "VQ-16")
    downsample = vq_cfg.downsample if vq_cfg else 16
    sd, layout = read_checkpoint(gpt_checkpoint)
    # A zoo name does not say the task; the checkpoint's condition embedder does.
    model_type = "t2i" if any(k.startswith("cls_embedding.cap_proj.") for k in sd) else "c2i"
    gpt = resolve_gpt_config(gpt_model, image_size=image_size, model_type=model_type)
    if gpt.model_type == "c2i" and gpt.class_dropout_prob <= 0:
        raise ConfigError("class_dropout_prob is 0: the model has no null class, so it cannot "
                          "use classifier-free guidance")
    if gpt.model_type == "t2i" and gpt.cls_token_num > T5_MAX_LENGTH:
        raise ConfigError(f"t2i cls_token_num {gpt.cls_token_num} exceeds the "
                          f"{T5_MAX_LENGTH}-row caption embedder")
    if gpt.model_type == "t2i" and class_names is not None:
        raise ConfigError("class names are for class-conditional (c2i) models")
    if gpt.model_type == "c2i" and text_encoder is not None:
        raise ConfigError("a text encoder is for text-conditional (t2i) models")
    encoder = None
    if text_encoder is not None:
        encoder = text_encoder_section(text_encoder, gpt)
    native = gpt.grid_size * downsample
    if image_size is not None and image_size != native:
        raise ConfigError(f"image size {image_size} does not match the config's "
                          f"{gpt.grid_size}x{gpt.grid_size} grid at downsample {downsample} "
                          f"({native} px)")
    if vq_cfg is not None and vq_cfg.codebook_size != gpt.vocab_size:
        raise ConfigError(f"VQ codebook_size {vq_cfg.codebook_size} != GPT vocab_size "
                          f"{gpt.vocab_size}")
    names = None
    if class_names is not None:
        names = parse_class_names(Path(class_names).read_text())
        if len(names) != gpt.num_classes:
            raise ConfigError(f"{class_names} has {len(names)} names for {gpt.num_classes} "
                              "classes")

    with torch.device("meta"):
        ref = Transformer(gpt)
    gpt_sd = strict_state_dict(sd, ref, f"GPT checkpoint {gpt_checkpoint}")
    vq_sd = None
    if vq_checkpoint is not None:
        assert vq_cfg is not None
        raw, vq_layout = read_checkpoint(vq_checkpoint)
        with torch.device("meta"):
            vq_ref = VQModel(vq_cfg)
        vq_sd = strict_state_dict(raw, vq_ref, f"VQ checkpoint {vq_checkpoint}")

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"output directory {out} is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(gpt_sd), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(vllm_config(gpt, native, downsample, encoder),
                                              indent=1))
    metadata = {
        "name": name or out.name,
        "software_version": software_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpt": {"source": Path(gpt_checkpoint).name, "layout": layout,
                "sha256": sha256_file(gpt_checkpoint), "config": _config_source(gpt_model)},
    }
    if vq_sd is not None:
        assert vq_cfg is not None
        (out / VQ_DIR).mkdir()
        save_file(_contiguous(vq_sd), out / VQ_DIR / WEIGHTS_FILE)
        (out / VQ_DIR / CONFIG_FILE).write_text(json.dumps(vq_cfg.to_dict(), indent=1))
        metadata["vq"] = {"source": Path(vq_checkpoint).name, "layout": vq_layout,
                          "sha256": sha256_file(vq_checkpoint),
                          "config": _config_source(vq_model or "VQ-16")}
    if names is not None:
        (out / CLASSES_FILE).write_text("".join(f"{i}, {n}\n" for i, n in enumerate(names)))
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return load_model_dir(out)
