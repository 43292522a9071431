"""What vLLM reads of this package: the general plugin that registers the LlamaGen
architecture in every vLLM process, the logits processor every engine must load, and the
config.json fields a model directory carries for vLLM.

Imports vLLM only when vLLM calls it, so the names here are cheap to import."""

from __future__ import annotations

from model_registry.configs import GPTConfig, padded_head_size

# The logits processor every LlamaGen engine must load (see model_registry/cfg.py).
CFG_PROCESSOR = "model_registry.cfg:CFGLogitsProcessor"


def register() -> None:
    from vllm import ModelRegistry

    if "LlamaGenForCausalLM" not in ModelRegistry.get_supported_archs():
        # A lazy "module:Class" string: vLLM imports the model only when it is used.
        ModelRegistry.register_model("LlamaGenForCausalLM",
                                     "model_registry.vllm_model:LlamaGenForCausalLM")


def vllm_config(gpt: GPTConfig, image_size: int, downsample: int,
                text_encoder: dict | None = None) -> dict:
    """config.json: what vLLM reads (sizes for the KV cache, the architecture) + our section."""
    config = {
        "architectures": ["LlamaGenForCausalLM"],
        "model_type": "llama",
        "hidden_size": gpt.dim,
        "num_hidden_layers": gpt.n_layer,
        "num_attention_heads": gpt.n_head,
        "num_key_value_heads": gpt.n_head,
        "head_dim": padded_head_size(gpt.head_dim),
        "intermediate_size": gpt.ffn_hidden,
        "rms_norm_eps": gpt.norm_eps,
        "hidden_act": "silu",
        # Prompt ids are image codes, then class ids offset by the codebook size, then null.
        "vocab_size": gpt.vocab_size + gpt.num_classes + 1,
        "max_position_embeddings": gpt.cls_token_num + gpt.block_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "llamagen": {"gpt": gpt.to_dict(), "image_size": image_size, "downsample": downsample},
    }
    if gpt.model_type == "t2i":
        # The prompt is caption embeddings, so no id beyond the codebook is ever fed.
        config["vocab_size"] = gpt.vocab_size
        # Turns on vLLM's per-request positions (see model_registry/vllm_model.py); the
        # sections describe the 2D RoPE's pairs: none temporal, hd/4 by row, hd/4 by column.
        config["mrope_section"] = [0, gpt.head_dim // 4, gpt.head_dim // 4]
        config["llamagen"]["text_encoder"] = text_encoder
    return config
