"""Attention over a 4-bit packed KV cache: the layout and the pure-torch oracle.

A cached key or value tensor ``[batch, kv_heads, tokens, head_dim]`` is held as :class:`PackedKV`: nibbles in
W4Ax's offset-binary packing (channel ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one) and fp16
scales per group of ``group_size`` head-dimension channels, per token or shared by every token. Element
``(.., t, c)`` is

- asymmetric (``minimum`` given): ``nibble * scale[.., t, c // group_size] + minimum[.., t, c // group_size]``;
- symmetric (``minimum`` None): ``(nibble - 8) * scale[.., t, c // group_size]``.

A scale tensor with one token (``[batch, kv_heads, 1, groups]``) is shared by every token (per-channel keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..w4ax_gemm.reference import unpack_int4


@dataclass(frozen=True)
class PackedKV:
    """One layer's cached keys or values in 4 bits.

    Attributes:
        codes: uint8 ``[batch, kv_heads, tokens, head_dim / 2]``.
        scale: fp16 ``[batch, kv_heads, tokens or 1, head_dim / group_size]``.
        minimum: fp16, ``scale``'s shape, or None for symmetric codes.
        group_size: head-dimension channels per scale.
        dtype: the dtype the dequantized values take (the model's).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """The dense shape ``[batch, kv_heads, tokens, head_dim]``."""
        return torch.Size((*self.codes.shape[:-1], 2 * self.codes.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.codes.device


def dequantize_packed(packed: PackedKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``packed`` as floats ``[batch, kv_heads, tokens, head_dim]`` in ``dtype`` (default: ``packed.dtype``),
    computed in float32."""
    signed = unpack_int4(packed.codes, packed.shape[-1]).float()
    if packed.minimum is not None:
        signed = signed + 8
    grouped = signed.reshape(*signed.shape[:-1], packed.scale.shape[-1], packed.group_size)
    values = grouped * packed.scale.float()[..., None]
    if packed.minimum is not None:
        values = values + packed.minimum.float()[..., None]
    return values.flatten(-2).to(dtype or packed.dtype)


def visible_keys(mask: torch.Tensor | None, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[batch or 1, heads or 1, queries, keys]``: which keys each query attends to. Without a mask the
    queries are the last ``queries`` positions of the ``keys`` and attend causally (bottom-right aligned)."""
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"kv4_attention takes a boolean mask (True = attend), got {mask.dtype}; register the "
                            "attention with transformers' sdpa_mask.")
        return mask[..., -queries:, :keys]
    rows = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return (torch.arange(keys, device=device)[None, :] <= rows)[None, None]


def kv4_attention_reference(query: torch.Tensor, key: PackedKV, value: PackedKV, mask: torch.Tensor | None = None,
                            scale: float | None = None) -> torch.Tensor:
    """Softmax attention of ``query [batch, heads, queries, head_dim]`` to the dequantized ``key``/``value`` in
    float64 -> ``[batch, queries, heads, head_dim]`` in ``query.dtype`` (the layout attention functions return).

    Grouped-query attention: query head ``h`` reads kv head ``h // (heads / kv_heads)``. ``mask``: boolean
    ``[batch, 1 or heads, queries, >= keys]`` or None for causal (:func:`visible_keys`). A query that sees no key
    gets zeros.
    """
    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    k = dequantize_packed(key, torch.float64).repeat_interleave(heads // kv_heads, dim=1)
    v = dequantize_packed(value, torch.float64).repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(head_dim))
    visible = visible_keys(mask, queries, keys, query.device)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype)
