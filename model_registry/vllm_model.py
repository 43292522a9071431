"""LlamaGen GPT as an out-of-tree vLLM model, with batched classifier-free guidance.

Each vLLM sequence is one image. It carries two streams side by side: the conditional one and
the unconditional one (null condition), which differ only at the condition positions. Hidden
states are `[T, 2, D]` (viewed as `[2T, D]` for the linear layers), attention runs `2H` heads
per layer (cond heads 0..H-1, uncond heads H..2H-1), so the paged KV cache holds both streams
and guidance survives continuous batching and preemption. `compute_logits` returns
`[N, 2V]` (cond | uncond); `model_registry.cfg.CFGLogitsProcessor`, which the engine must load,
combines them per request.

Positions are the original's sequence positions: image token k is fed at `cls_token_num + k`;
the 2D RoPE table is indexed by position, and its condition rows are zero (cos = sin = 0).

c2i: the prompt is one token, `codebook_size + class_id`; the null stream uses the null class.
A negative class n (guidance away from it) takes the null class's place: the prompt's token
is then `codebook_size + class_id + (num_classes + 1) * (n + 1)`, one id for the pair, so
prefix caching tells pairs apart and positions stay the original's.

Completion (edits): the prompt may continue with the first P image codes, fed at their own
positions in both streams; vLLM then generates tokens P.. of the grid.

t2i: the prompt is `prompt_embeds`, the projected caption (`cap_proj` of the T5 features) of the
L valid caption tokens only (a mixed prompt: the caption rows as embeddings with a placeholder
id, then any prefix codes as token ids). Each row carries both streams, `[guided | unguided]`
(vLLM's hidden size is 2 dim for t2i models): the unguided half is `cap_proj(uncond_embedding)`
at the same slots, or a negative caption's rows (`engine.conditions.stream_rows`). The
original left-pads captions to 120 slots and masks the padded keys for every other position,
in both streams. Padded slots influence nothing but themselves, so dropping them
is exact, and it is the cheapest option: no prefill, KV cache or attention reads for padding,
and no wider heads (the alternative, an extra head coordinate driving padded keys to -inf, costs
every attention op a quarter more at head_dim 64). What dropping changes is the positions: the L
caption tokens must sit at slots 120-L..119 and image token k at 120 + k. vLLM's per-request
position mechanism (M-RoPE, `get_mrope_input_positions`) supplies exactly that: the prompt's
positions and a per-request offset (120 - L) that vLLM adds to every generated token's position.
The engine sees `mrope_section` in config.json for t2i models only; every position row holds the
same original position, and this model applies its own 2D RoPE from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
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
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsMRoPE
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


def per_stream(layer: nn.Module, x: torch.Tensor, split: bool) -> torch.Tensor:
    """A linear layer over both guidance streams' rows, x [2T, D] (t-cond, t-uncond, ...).

    One matmul of 2T rows, except with LoRA on (`split`): vLLM's LoRA layers map adapters to
    the T scheduled tokens, row for row, so each stream then goes through the layer alone
    (T rows each) and both see the token's adapter."""
    if not split:
        return layer(x)[0]
    rows = x.view(-1, 2, x.shape[-1])
    return torch.stack([layer(rows[:, s].contiguous())[0] for s in (0, 1)],
                       dim=1).flatten(0, 1)


class LlamaGenAttention(nn.Module):
    def __init__(self, config: GPTConfig, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str, lora: bool = False):
        super().__init__()
        self.lora = lora
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
        qkv = per_stream(self.wqkv, hidden_states, self.lora)
        # [2T, 3*H*hd] -> three [T, 2H, hd]: per token the cond heads, then the uncond heads.
        q, k, v = (t.reshape(T, 2 * self.num_heads, self.head_dim)
                   for t in qkv.view(T, 2, -1).chunk(3, dim=-1))
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        pad = self.attn_head_dim - self.head_dim
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))
        out = out.view(T, 2 * self.num_heads, self.attn_head_dim)[..., : self.head_dim]
        return per_stream(self.wo, out.reshape(2 * T, self.num_heads * self.head_dim), self.lora)


class LlamaGenFeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 merged into one matmul (`w13`)."""

    def __init__(self, config: GPTConfig, quant_config: QuantizationConfig | None, prefix: str,
                 lora: bool = False):
        super().__init__()
        self.lora = lora
        self.w13 = MergedColumnParallelLinear(config.dim, [config.ffn_hidden] * 2, bias=False,
                                              quant_config=quant_config, prefix=f"{prefix}.w13")
        self.w2 = RowParallelLinear(config.ffn_hidden, config.dim, bias=False,
                                    quant_config=quant_config, prefix=f"{prefix}.w2")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = per_stream(self.w13, x, self.lora)
        return per_stream(self.w2, self.act_fn(x), self.lora)


class LlamaGenBlock(nn.Module):
    def __init__(self, config: GPTConfig, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str, lora: bool = False):
        super().__init__()
        self.attention = LlamaGenAttention(config, cache_config, quant_config,
                                           f"{prefix}.attention", lora)
        self.feed_forward = LlamaGenFeedForward(config, quant_config, f"{prefix}.feed_forward",
                                                lora)
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


# vLLM compiles forward (and, on GPUs, captures it in CUDA graphs) over the number of
# scheduled tokens; t2i positions are (rows, tokens), as for Qwen2-VL's M-RoPE.
@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {-1: "b"},
                                         "intermediate_tensors": {0: "b"},
                                         "inputs_embeds": {0: "b"}})
class LlamaGenForCausalLM(nn.Module, SupportsMRoPE, SupportsLoRA):
    # LoRA (PEFT adapters of the original gpt.py): w1 and w3 are one merged layer here;
    # wqkv is one layer in both (one adapter slice over q, k and v).
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"wqkv": ["wqkv"],
                                                              "w13": ["w1", "w3"]}
    embedding_modules: ClassVar[dict[str, str]] = {}
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
        self.config = config
        self.is_t2i = config.model_type == "t2i"
        if self.is_t2i and not (model_config.uses_mrope and model_config.enable_prompt_embeds):
            raise ValueError("a t2i LlamaGen needs per-request positions (config.json "
                             "mrope_section, written by `llamagen convert`) and "
                             "enable_prompt_embeds=True")
        self.position_rows = model_config.mrope_num_dims
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.codebook_size = config.vocab_size
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.dim,
                                                     prefix=f"{prefix}tok_embeddings")
        # t2i: both streams' caption rows arrive as prompt embeddings, projected by the
        # front-end (cap_proj and uncond_embedding have no use here).
        if not self.is_t2i:
            self.cls_embedding = nn.Module()
            self.cls_embedding.embedding_table = VocabParallelEmbedding(
                config.num_classes + 1, config.dim,
                prefix=f"{prefix}cls_embedding.embedding_table")
        lora = vllm_config.lora_config is not None
        self.layers = nn.ModuleList(
            LlamaGenBlock(config, cache_config, quant_config, f"{prefix}layers.{i}", lora)
            for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = ParallelLMHead(config.vocab_size, config.dim, quant_config=quant_config,
                                     prefix=f"{prefix}output")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num),
            persistent=False)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list
                                  ) -> tuple[torch.Tensor, int]:
        """The prompt's original positions and the offset vLLM adds to generated tokens'.

        A t2i prompt holds the L valid caption rows (as embeddings, with the placeholder id
        `codebook_size` in `input_tokens`), then any prefix image codes (completion). The
        original places the caption at slots 120-L..119, so every prompt row and every
        generated token sits `120 - L` after its index in the sequence."""
        C, T = self.codebook_size, self.config.cls_token_num
        caption = sum(1 for t in input_tokens if t >= C)
        if caption == 0 or any(t < C for t in input_tokens[:caption]):
            raise ValueError("a t2i LlamaGen prompt is the caption's rows, marked with the "
                             f"placeholder id {C}, then prefix image codes")
        if caption > T:
            raise ValueError(f"a LlamaGen prompt has at most {T} condition tokens, got "
                             f"{caption}")
        offset = T - caption
        positions = torch.arange(offset, offset + len(input_tokens))
        return positions.expand(self.position_rows, -1).clone(), offset

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """c2i: guided-stream embeddings of image codes and class tokens. t2i: image codes in
        both streams, [T, 2 dim], as prompt embedding rows are (captions never pass here)."""
        if self.is_t2i:
            tok = self.tok_embeddings(input_ids)
            return torch.cat([tok, tok], dim=-1)
        return self._c2i_embeddings(input_ids, guided=True)

    def _c2i_embeddings(self, input_ids: torch.Tensor, guided: bool) -> torch.Tensor:
        """Image codes, or the class a class token names in the guided stream (`id - C`
        modulo K = num_classes + 1) or the unguided one (`(id - C) // K`: 0 the null class,
        n + 1 the negative class n)."""
        C, K = self.codebook_size, self.config.num_classes + 1
        is_class = input_ids >= C
        code = torch.where(is_class, input_ids - C, 0)
        if guided:
            label = code % K
        else:
            pair = code // K
            label = torch.where(pair == 0, self.config.null_class, pair - 1)
        tok = self.tok_embeddings(torch.where(is_class, 0, input_ids))
        cls = self.cls_embedding.embedding_table(label)
        return torch.where(is_class[:, None], cls, tok)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if positions.ndim == 2:  # per-request positions (t2i): every row is the same
            positions = positions[0]
        is_condition = positions < self.config.cls_token_num
        if input_ids is not None:
            # A fed-back id must be an image code; the CFG processor guarantees it.
            torch._assert_async(~(is_condition.logical_not() & (input_ids >= self.codebook_size))
                                .any(), "LlamaGen: an image position got an id >= codebook size")
        if self.is_t2i:  # rows [guided | unguided]; image codes are alike in both halves
            rows = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            cond, uncond = rows.chunk(2, dim=-1)
        else:
            assert input_ids is not None, "a c2i LlamaGen prompt is token ids"
            cond = self.embed_input_ids(input_ids)
            uncond = torch.where(is_condition[:, None],
                                 self._c2i_embeddings(input_ids, guided=False), cond)
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
        caption: dict[str, torch.Tensor] = {}  # t2i: cap_proj and uncond_embedding
        for name, tensor in weights:
            if name == "freqs_cis":  # stale RoPE table in some official files
                continue
            if self.is_t2i and name.startswith("cls_embedding."):
                # The front-end projects captions (and the null caption) itself.
                caption[name.removeprefix("cls_embedding.")] = tensor
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
        if self.is_t2i:
            needed = {"uncond_embedding", "cap_proj.fc1.weight", "cap_proj.fc2.weight"}
            if set(caption) != needed:
                raise ValueError(f"t2i checkpoint caption weights {sorted(caption)}, expected "
                                 f"{sorted(needed)}")
        return loaded
