"""The attention function of 4-bit KV caches: queries attend to :class:`~hf_plugins.kernels.kv4_attention.PackedKV`
keys and values without a dense copy of the cache.

Registered as :data:`KV4_ATTENTION` (with transformers' ``sdpa_mask``, so padding reaches it as a boolean mask).
A ``W4A4KV4Config(kv_bits=4)`` model selects it and its ``generate`` makes a ``KV4Cache(packed_outputs=True)``.

- Decoding and speculative verification (at most :data:`PACKED_QUERY_LIMIT` query tokens) on CUDA: the Triton
  kernel reads the nibbles and scales straight from the cache.
- Prefill, and every call on CPU: dequantize once, then transformers' SDPA attention (compute-bound, or on a CPU
  where the cache's bytes matter little); the same numbers as a ``KV4Cache`` returning dense tensors.
- Dense keys and values (no KV4 cache, or training): transformers' SDPA attention, unchanged.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..kernels._dispatch import choose_backend
from ..kernels.kv4_attention import PackedKV, dequantize_packed, kv4_attention

KV4_ATTENTION = "hf_plugins_kv4"
PACKED_QUERY_LIMIT = 16
"""Query tokens per call up to which attention reads the packed cache; longer calls are compute-bound."""


def kv4_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``query [batch, heads, queries, head_dim]``, ``key``/``value``
    ``[batch, kv_heads, tokens, head_dim]`` as tensors or ``PackedKV`` -> ``([batch, queries, heads, head_dim],
    None)``."""
    if isinstance(key, PackedKV):
        backend = choose_backend("kv4_attention", query.device)
        if backend != "cpu" and query.shape[2] <= PACKED_QUERY_LIMIT and not (module.training and dropout):
            return kv4_attention(query, key, value, attention_mask, scaling, backend=backend), None
        key, value = dequantize_packed(key), dequantize_packed(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
