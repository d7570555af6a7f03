"""Attention functions registered with transformers' AttentionInterface."""

from .ring import ring_attention, ring_attention_forward, ring_attention_mask

RING_ATTENTION = "ring_attention"

__all__ = ["RING_ATTENTION", "ring_attention", "ring_attention_forward", "ring_attention_mask"]
