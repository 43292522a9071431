"""LlamaGen GPT (autoregressive/models/gpt.py) in plain PyTorch.

The reference model: tests compare the vLLM model against it, the offline benchmark uses it as
the baseline, and the demo model is trained with it. Parameter names are the checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_registry.configs import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, THEN scale: the original's order.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


class LabelEmbedder(nn.Module):
    """Class labels -> one condition token; row `num_classes` is the null class for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 caption features (B, 120, caption_dim) -> condition tokens; a learned null caption."""

    def __init__(self, caption_dim: int, dim: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding",
                             torch.randn(token_num, caption_dim) / caption_dim**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        if self.training and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    def __init__(self, batch: int, seq_len: int, n_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        shape = (batch, n_head, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def precompute_freqs_cis_2d(grid_size: int, n_elem: int, base: float = 10000,
                            cls_token_num: int = 120) -> torch.Tensor:
    """(cls_token_num + grid², n_elem/2, 2) table of (cos, sin).

    Pairs 0..n_elem/4-1 rotate with the row, the rest with the column; condition rows are
    cos = sin = 0, which zeroes the condition tokens' queries and keys (a quirk to keep).
    """
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    t = torch.arange(grid_size, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.cat([freqs[:, None, :].expand(-1, grid_size, -1),
                            freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache_grid = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1)
    cache = cache_grid.flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x[2i], x[2i+1]) rotated in fp32. x (B, S, H, hd), freqs (S, hd/2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    x_out = torch.stack([
        xs[..., 0] * freqs_cis[..., 0] - xs[..., 1] * freqs_cis[..., 1],
        xs[..., 1] * freqs_cis[..., 0] + xs[..., 0] * freqs_cis[..., 1],
    ], dim=-1)
    return x_out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dim, self.n_head, self.head_dim = config.dim, config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        xq = apply_rotary_emb(xq.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        xk = apply_rotary_emb(xk.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        xv = xv.view(bsz, seqlen, self.n_head, self.head_dim)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        if self.kv_cache is not None:
            keys, values = self.kv_cache.update(input_pos, xk, xv)
        else:
            keys, values = xk, xv
        out = F.scaled_dot_product_attention(
            xq, keys, values, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0)
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(config.num_classes, config.dim,
                                                          config.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim,
                                                 config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Not a checkpoint entry (official files may hold a stale copy; loaders drop it).
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num),
            persistent=False)
        self.causal_mask: torch.Tensor | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.data.normal_(mean=0.0, std=std)
        # The original zero-initialises the head: a fresh model has all-zero logits.
        nn.init.constant_(self.output.weight, 0)

    def setup_caches(self, max_batch_size: int, max_seq_length: int,
                     dtype: torch.dtype | None = None) -> None:
        max_seq_length = (max_seq_length + 7) // 8 * 8  # as the original
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length,
                                               self.config.n_head, self.config.head_dim, dtype,
                                               device)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool,
                                       device=device))
        self.causal_mask = causal.unsqueeze(0).repeat(max_batch_size, 1, 1)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.cls_embedding(cond)[:, : self.config.cls_token_num]

    def forward(self, idx: torch.Tensor | None, cond_idx: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Three modes, as the original:

        - teacher forcing (idx and cond_idx, no caches): logits predicting every image token,
          (B, len(idx) + 1, V);
        - prefill (cond_idx only, caches set up): logits at the condition positions;
        - decode (idx only): logits at `input_pos`.
        """
        if idx is not None and cond_idx is not None:
            h = torch.cat([self.condition(cond_idx), self.tok_embeddings(idx)], dim=1)
            freqs_cis = self.freqs_cis[: h.shape[1]]
        elif cond_idx is not None:
            h = self.condition(cond_idx)
            freqs_cis = self.freqs_cis[input_pos]
        else:
            assert idx is not None
            h = self.tok_embeddings(idx)
            freqs_cis = self.freqs_cis[input_pos]
        h = self.tok_dropout(h)
        if input_pos is not None and mask is None:
            assert self.causal_mask is not None, "call setup_caches() before cached inference"
            mask = self.causal_mask[: h.shape[0], None, input_pos]
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        logits = self.output(self.norm(h)).float()
        if idx is not None and cond_idx is not None:
            logits = logits[:, self.config.cls_token_num - 1:]
        return logits
