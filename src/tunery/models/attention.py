"""Attention for CPU training: plain matrix-product attention for short sequences, sdpa beyond.

On a CPU, torch's fused scaled-dot-product attention (its flash kernel for CPUs) is slow for
the short sequences most fine-tuning rows are: forward plus backward over 4096 bf16 tokens
(9 query heads, 3 key/value heads, head size 64; SmolLM2-135M) measured 73 ms as 64 rows of 64
tokens against 26 ms for the same attention written as two matrix products and a softmax
(transformers' "eager" attention); the products lose from ~256 tokens on (80 against 102 ms),
as their memory grows with the square of the length. `sdpa_short_eager` — the implementation
`attn_implementation=auto` picks when training on a CPU — runs the products when the keys are
at most `SHORT_KEYS` long and sdpa otherwise. Both compute the same function: the masks are
sdpa's (boolean, causal, padding and packed-sequence aware), the softmax is in fp32.
"""

from __future__ import annotations

import torch

NAME = "sdpa_short_eager"
SHORT_KEYS = 192


def sdpa_short_eager_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len, kv_len = query.shape[-2], key.shape[-2]
    if kv_len > SHORT_KEYS or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :kv_len]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, None


def register() -> str:
    """Register `sdpa_short_eager` (attention and mask functions) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_short_eager_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
