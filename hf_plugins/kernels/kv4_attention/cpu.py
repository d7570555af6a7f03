"""Attention over a packed 4-bit KV cache on CPU: dequantize to the query's dtype, then torch's fused SDPA (its
CPU kernel is the fastest attention torch offers there; the cache's bytes matter far less than on a GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import PackedKV, dequantize_packed, visible_keys


def kv4_attention_cpu(query: torch.Tensor, key: PackedKV, value: PackedKV, mask: torch.Tensor | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Same contract as :func:`~.reference.kv4_attention_reference`, computed in ``query.dtype``."""
    queries, keys = query.shape[2], key.shape[2]
    k, v = dequantize_packed(key, query.dtype), dequantize_packed(value, query.dtype)
    visible = visible_keys(mask, queries, keys, query.device)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=visible, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)
