"""Reference generation loop, faithful to the original autoregressive/models/generate.py.

Two-row classifier-free guidance (a conditional and a null-condition row per image, a static
KV cache), HF-style top-k/top-p filtering and `torch.multinomial`. Tests use it as the truth
for the vLLM engine; `llamagen bench offline` uses it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_registry.gpt import Transformer


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf"), min_tokens_to_keep: int = 1
                          ) -> torch.Tensor:
    """HF transformers v3.2 filtering: ties with the k-th value survive top-k; top-p keeps the
    token that crosses the threshold."""
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_remove = cumulative_probs > top_p
        if min_tokens_to_keep > 1:
            sorted_remove[..., :min_tokens_to_keep] = False
        sorted_remove[..., 1:] = sorted_remove[..., :-1].clone()
        sorted_remove[..., 0] = False
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) after guidance -> tokens (B, 1)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _guide(logits: torch.Tensor, cfg_scale: float, guided: bool) -> torch.Tensor:
    """(2B, V) cond rows then uncond rows -> (B, V)."""
    cond, uncond = torch.split(logits, logits.shape[0] // 2, dim=0)
    return uncond + (cond - uncond) * cfg_scale if guided else cond


def _mask_condition(model: Transformer, emb_masks: torch.Tensor) -> None:
    """Zero the key columns of padded condition slots; every position still sees itself."""
    mask = model.causal_mask
    assert mask is not None
    T = emb_masks.shape[1]
    mask[:, :, :T] &= emb_masks.bool()[:, None, :]
    mask |= torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)


@torch.inference_mode()
def generate(model: Transformer, cond: torch.Tensor, max_new_tokens: int | None = None, *,
             emb_masks: torch.Tensor | None = None, cfg_scale: float = 1.0,
             cfg_interval: int = -1, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator | None = None,
             prefix: torch.Tensor | None = None,
             negative: torch.Tensor | None = None) -> torch.Tensor:
    """Conditions -> image tokens (B, max_new_tokens) in raster order.

    `prefix` (B, P): completion. The first P image tokens are given; the condition and the
    prefix are prefilled (both guidance rows see the same prefix at the original positions),
    and generation continues from token P. The result holds the prefix in its first P
    columns, so it is still (B, max_new_tokens) with max_new_tokens counting the prefix.

    c2i: `cond` holds class labels (B,). t2i: `cond` holds caption features (B, 120, caption_dim),
    left-padded and zeroed where `emb_masks` (B, 120) is 0; padded slots are hidden from every
    other position in both halves, as the original does.

    `negative`: what the unconditional half is conditioned on instead of the null condition
    (guidance away from it), shaped as `cond`: class labels (c2i) or caption features (t2i;
    `emb_masks` then masks both halves, as the original does, so give the union of the two
    captions' masks).

    `cfg_scale <= 1` runs no unconditional rows at all. With `cfg_interval = n > -1` image tokens
    0..n+1 are guided and the rest use the conditional logits (the null rows keep running);
    with a prefix the count is the same, as if the prefix had been generated.
    """
    config = model.config
    max_new_tokens = max_new_tokens or config.block_size
    use_cfg = cfg_scale > 1.0
    P = 0 if prefix is None else prefix.shape[1]
    if not 0 <= P < max_new_tokens:
        raise ValueError(f"a prefix holds 0..{max_new_tokens - 1} tokens, got {P}")
    if negative is not None:
        null = negative
    elif config.model_type == "c2i":
        null = torch.full_like(cond, config.null_class)
    else:
        null = torch.zeros_like(cond) + model.cls_embedding.uncond_embedding
    cond_combined = torch.cat([cond, null]) if use_cfg else cond
    T = config.cls_token_num
    rows = cond_combined.shape[0]
    device = cond.device
    model.setup_caches(rows, T + max_new_tokens)
    if emb_masks is not None:
        _mask_condition(model, torch.cat([emb_masks, emb_masks]) if use_cfg else emb_masks)
    try:
        seq = torch.empty(cond.shape[0], max_new_tokens, dtype=torch.long, device=device)
        logits = model(None, cond_combined, torch.arange(0, T, device=device))[:, -1]
        if prefix is not None and P:
            seq[:, :P] = prefix
            x = torch.cat([prefix, prefix]) if use_cfg else prefix
            logits = model(x, None, torch.arange(T, T + P, device=device))[:, -1]
        input_pos = torch.tensor([T + P], device=device)
        for t in range(P, max_new_tokens):  # t: the image token being sampled
            if use_cfg:
                # Token 0 (the condition's prefill) is always guided.
                guided = cfg_interval == -1 or t <= cfg_interval + 1
                logits = _guide(logits, cfg_scale, guided)
            tok = sample(logits, temperature, top_k, top_p, greedy, generator)
            seq[:, t: t + 1] = tok
            if t + 1 < max_new_tokens:
                x = torch.cat([tok, tok]) if use_cfg else tok
                logits = model(x, None, input_pos)[:, -1]
                input_pos += 1
    finally:
        model.clear_caches()
    return seq
