"""Random-weight LlamaGen checkpoints in the official file layouts, for tests and benchmarks.

No machine here can download real weights, so everything that loads checkpoints is exercised
on files made like the official ones: `{"model": sd, "steps", "args"}` (DDP), the bare FSDP
dict, with or without a stale `freqs_cis`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import torch

from model_registry.configs import GPTConfig
from model_registry.gpt import Transformer, precompute_freqs_cis_2d
from vq_decoder.vq_model import VQConfig, VQModel

Layout = Literal["ddp", "fsdp"]

# Scales that give attention some structure (N(0, 0.02) makes it near-uniform, hiding position
# bugs) and greedy margins well above fp32 noise; the head is re-randomised because the
# original zero-initialises it.
STDS = {"qkv": 0.13, "other": 0.06, "emb": 0.07, "out": 0.12, "norm": 0.15}


def random_gpt_state_dict(config: GPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # shapes only
        model = Transformer(config)
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = 1 + STDS["norm"] * torch.randn(t.shape, generator=g)
        elif name == "cls_embedding.uncond_embedding":
            value = torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5
        else:
            kind = ("qkv" if "wqkv" in name else "out" if name == "output.weight"
                    else "emb" if "embedding" in name else "other")
            value = STDS[kind] * torch.randn(t.shape, generator=g)
        sd[name] = value
    return sd


def save_gpt_checkpoint(config: GPTConfig, path: str | Path, *, layout: Layout = "ddp",
                        stale_freqs_cis: bool = False, seed: int = 0,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    sd = dict(state_dict if state_dict is not None else random_gpt_state_dict(config, seed))
    if stale_freqs_cis:
        sd["freqs_cis"] = precompute_freqs_cis_2d(config.grid_size, config.head_dim,
                                                  config.rope_base, config.cls_token_num)
    ckpt: dict = sd if layout == "fsdp" else {
        "model": sd, "steps": 0, "args": argparse.Namespace(gpt_model="random")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def random_vq_state_dict(config: VQConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = VQModel(config)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, t in sd.items():
        if ".norm" in name and name.endswith("weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        elif ".norm" in name and name.endswith("bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return sd


def save_vq_checkpoint(config: VQConfig, path: str | Path, seed: int = 0,
                       state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    sd = state_dict if state_dict is not None else random_vq_state_dict(config, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, path)
    return path


# Words for the tiny tokenizer; anything else is <unk>, so any caption tokenises.
_TINY_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "by", "to", "from", "red",
    "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "small", "large",
    "big", "tiny", "cat", "dog", "bird", "horse", "car", "house", "tree", "flower", "mountain",
    "river", "sea", "sky", "sun", "moon", "city", "street", "beach", "forest", "photo",
    "painting", "drawing", "portrait", "sitting", "running", "flying", "standing", "under",
    "over", "near", "two", "three", "many", "old", "young", "happy", "dark", "bright", "night",
    "day", "winter", "summer",
)


def save_tiny_t5(path: str | Path, d_model: int = 64, seed: int = 0) -> Path:
    """A random T5 encoder and a word-level tokenizer built from a config: the text encoder
    of t2i tests and benchmarks (the real FLAN-T5-XL cannot be downloaded here).

    The tokenizer behaves like T5's where it matters: it appends `</s>`, pads with `<pad>` on
    the right, and truncation keeps `</s>` last."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = Path(path)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in dict.fromkeys(_TINY_WORDS):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>",
                                        padding_side="right", model_max_length=512)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=32, d_ff=2 * d_model,
                      num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_lora_adapter(model_dir: Any, path: str | Path, *, rank: int = 4, alpha: float = 8,
                      targets: tuple[str, ...] = ("wqkv", "wo", "w1", "w2", "w3"),
                      seed: int = 0, std: float = 0.05) -> Path:
    """A random LoRA adapter for a model directory's GPT, saved by `peft` in its own format
    (what fine-tuning the original gpt.py with peft gives): A and B drawn N(0, std²), so that
    the adapter changes the tokens without drowning the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    reference = model_dir.load_reference()
    peft_model = get_peft_model(reference, LoraConfig(r=rank, lora_alpha=alpha,
                                                      target_modules=list(targets),
                                                      init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(str(path))
    return Path(path)
