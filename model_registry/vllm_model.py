"""LlamaGen GPT as an out-of-tree vLLM model, with batched classifier-free guidance.

Each vLLM sequence is one image. It carries two streams side by side: the conditional one and
the unconditional one (null class), which differ only at the condition positions. Hidden
states are `[T, 2, D]` (viewed as `[2T, D]` for the linear layers), attention runs `2H` heads
per layer (cond heads 0..H-1, uncond heads H..2H-1), so the paged KV cache holds both streams
and guidance survives continuous batching and preemption. `compute_logits` returns
`[N, 2V]` (cond | uncond); `model_registry.cfg.CFGLogitsProcessor`, which the engine must load,
combines them per request.

Prompts are the condition: for c2i one token, `codebook_size + class_id`. Image token k is fed
at position `cls_token_num + k`; the 2D RoPE table is indexed by position, and its condition
rows are zero (cos = sin = 0), exactly as the original.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from model_registry.configs import GPTConfig, padded_head_size
from model_registry.gpt import precompute_freqs_cis_2d
from model_registry.plugin import CFG_PROCESSOR


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """LlamaGen's interleaved-pair rotary in fp32. x [T, heads, hd], freqs_cis [T, hd/2, 2]."""
    xs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs_cis[:, None, :, 0], freqs_cis[:, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class LlamaGenAttention(nn.Module):
    def __init__(self, config: GPTConfig, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        assert config.n_head % tp_size == 0, "n_head must divide by the tensor-parallel size"
        self.num_heads = config.n_head // tp_size
        self.head_dim = config.head_dim
        self.attn_head_dim = padded_head_size(self.head_dim)
        self.wqkv = QKVParallelLinear(config.dim, self.head_dim, config.n_head, config.n_head,
                                      bias=False, quant_config=quant_config,
                                      prefix=f"{prefix}.wqkv")
        self.wo = RowParallelLinear(config.dim, config.dim, bias=False,
                                    quant_config=quant_config, prefix=f"{prefix}.wo")
        self.attn = Attention(2 * self.num_heads, self.attn_head_dim, self.head_dim**-0.5,
                              num_kv_heads=2 * self.num_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """hidden_states [2T, D] (rows: t-cond, t-uncond, ...), freqs_cis [T, hd/2, 2]."""
        T = freqs_cis.shape[0]
        qkv, _ = self.wqkv(hidden_states)
        # [2T, 3*H*hd] -> three [T, 2H, hd]: per token the cond heads, then the uncond heads.
        q, k, v = (t.reshape(T, 2 * self.num_heads, self.head_dim)
                   for t in qkv.view(T, 2, -1).chunk(3, dim=-1))
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        pad = self.attn_head_dim - self.head_dim
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))
        out = out.view(T, 2 * self.num_heads, self.attn_head_dim)[..., : self.head_dim]
        out, _ = self.wo(out.reshape(2 * T, self.num_heads * self.head_dim))
        return out


class LlamaGenFeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 merged into one matmul (`w13`)."""

    def __init__(self, config: GPTConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.w13 = MergedColumnParallelLinear(config.dim, [config.ffn_hidden] * 2, bias=False,
                                              quant_config=quant_config, prefix=f"{prefix}.w13")
        self.w2 = RowParallelLinear(config.ffn_hidden, config.dim, bias=False,
                                    quant_config=quant_config, prefix=f"{prefix}.w2")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.w13(x)
        x, _ = self.w2(self.act_fn(x))
        return x


class LlamaGenBlock(nn.Module):
    def __init__(self, config: GPTConfig, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.attention = LlamaGenAttention(config, cache_config, quant_config,
                                           f"{prefix}.attention")
        self.feed_forward = LlamaGenFeedForward(config, quant_config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.attention_norm(hidden_states)
        else:
            hidden_states, residual = self.attention_norm(hidden_states, residual)
        hidden_states = self.attention(hidden_states, freqs_cis)
        hidden_states, residual = self.ffn_norm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual


class LlamaGenForCausalLM(nn.Module):
    # checkpoint name -> (parameter name, shard id), as llama.py's stacked_params_mapping.
    stacked_params_mapping: ClassVar[list[tuple[str, str, int]]] = [
        (".feed_forward.w13", ".feed_forward.w1", 0),
        (".feed_forward.w13", ".feed_forward.w3", 1),
    ]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        processors = [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"
                      for p in (model_config.logits_processors or [])]
        if CFG_PROCESSOR not in processors:
            # Without it vLLM would sample from the 2V-wide cond|uncond row: ids >= V.
            raise ValueError(f"LlamaGen needs the logits processor {CFG_PROCESSOR!r}; pass "
                             f"logits_processors=[{CFG_PROCESSOR!r}] to the engine")
        config = GPTConfig.from_dict(model_config.hf_config.llamagen["gpt"])
        if config.model_type != "c2i":
            raise ValueError("the vLLM LlamaGen model serves class-conditional (c2i) models")
        self.config = config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.codebook_size = config.vocab_size
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.dim,
                                                     prefix=f"{prefix}tok_embeddings")
        self.cls_embedding = nn.Module()
        self.cls_embedding.embedding_table = VocabParallelEmbedding(
            config.num_classes + 1, config.dim, prefix=f"{prefix}cls_embedding.embedding_table")
        self.layers = nn.ModuleList(
            LlamaGenBlock(config, cache_config, quant_config, f"{prefix}layers.{i}")
            for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = ParallelLMHead(config.vocab_size, config.dim, quant_config=quant_config,
                                     prefix=f"{prefix}output")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num),
            persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Conditional-stream embeddings: image codes, or class ids offset by codebook_size."""
        is_class = input_ids >= self.codebook_size
        tok = self.tok_embeddings(torch.where(is_class, 0, input_ids))
        cls = self.cls_embedding.embedding_table(
            torch.where(is_class, input_ids - self.codebook_size, 0))
        return torch.where(is_class[:, None], cls, tok)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        is_condition = positions < self.config.cls_token_num
        if input_ids is not None:
            # A fed-back id must be an image code; the CFG processor guarantees it.
            torch._assert_async(~(is_condition.logical_not() & (input_ids >= self.codebook_size))
                                .any(), "LlamaGen: an image position got an id >= codebook size")
        cond = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        null = self.embed_input_ids(torch.full_like(positions,
                                                    self.codebook_size + self.config.null_class))
        uncond = torch.where(is_condition[:, None], null, cond)
        hidden_states = torch.stack([cond, uncond], dim=1).flatten(0, 1)  # [2T, D]
        freqs_cis = self.freqs_cis[positions]
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, freqs_cis)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states.view(positions.shape[0], -1)  # [T, 2D]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[0]
        logits = self.logits_processor(self.output, hidden_states.view(2 * n, -1))
        return logits.view(n, -1)  # [N, 2V]: cond | uncond

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "freqs_cis":  # stale RoPE table in some official files
                continue
            for param_name, ckpt_name, shard_id in self.stacked_params_mapping:
                if ckpt_name in name:
                    name = name.replace(ckpt_name, param_name)
                    param = params[name]
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in the LlamaGen checkpoint")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
