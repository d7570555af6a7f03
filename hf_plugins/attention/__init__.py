"""Attention functions registered with transformers' AttentionInterface."""

from .kv4 import KV4_ATTENTION, PACKED_QUERY_LIMIT, kv4_attention_forward
from .ring import ring_attention, ring_attention_forward, ring_attention_mask

RING_ATTENTION = "ring_attention"

__all__ = [
    "KV4_ATTENTION",
    "PACKED_QUERY_LIMIT",
    "RING_ATTENTION",
    "kv4_attention_forward",
    "ring_attention",
    "ring_attention_forward",
    "ring_attention_mask",
]
