"""Attention over a 4-bit packed KV cache (:class:`PackedKV`), with backend dispatch.

Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`kv4_attention_reference`, dequantize and attend in float64, the test oracle.
- ``cpu``: :func:`~.cpu.kv4_attention_cpu`, dequantize to the query's dtype and torch's SDPA.
- ``triton``: :func:`~.triton.kv4_attention_triton`, split-KV attention reading the packed nibbles, imported on
  first use.
"""

import torch

from .._dispatch import choose_backend
from .cpu import kv4_attention_cpu
from .reference import PackedKV, dequantize_packed, kv4_attention_reference, visible_keys

__all__ = [
    "PackedKV",
    "dequantize_packed",
    "kv4_attention",
    "kv4_attention_cpu",
    "kv4_attention_reference",
    "visible_keys",
]


def kv4_attention(query: torch.Tensor, key: PackedKV, value: PackedKV, mask: torch.Tensor | None = None,
                  scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention of ``query [batch, heads, queries, head_dim]`` to packed keys and values ``[batch,
    kv_heads, tokens, head_dim]`` -> ``[batch, queries, heads, head_dim]`` in ``query.dtype``.

    Args:
        mask: boolean ``[batch, 1 or heads, queries, >= tokens]`` (True = attend), or None: the queries are the
            last ``queries`` tokens and attend causally.
        scale: the score scale (default ``head_dim ** -0.5``).
        backend: ``reference``, ``cpu``, ``triton`` or None (the device decides).
    """
    chosen = choose_backend("kv4_attention", query.device, backend)
    if chosen == "reference":
        return kv4_attention_reference(query, key, value, mask, scale)
    if chosen == "cpu":
        return kv4_attention_cpu(query, key, value, mask, scale)
    from .triton import kv4_attention_triton

    return kv4_attention_triton(query, key, value, mask, scale)
