"""Speculative decoding (``generate(assistant_model=...)`` through our lossless batched loop, EasySpec drafting,
self-drafts, acceptance metrics) and the 4-bit KV cache."""

from __future__ import annotations

from .acceptance import greedy_accept, rejection_sample
from .config import SpeculativeConfig
from .drafting import DraftModelCandidates
from .enable import disable_speculative, enable_speculative, is_speculative_enabled
from .kv4_cache import KV4Cache, use_kv4_cache_if_configured
from .loop import SpeculativeGenerateOutput, speculative_generate
from .self_draft import self_draft
from .stats import SpeculativeStats

__all__ = [
    "DraftModelCandidates",
    "KV4Cache",
    "SpeculativeConfig",
    "SpeculativeGenerateOutput",
    "SpeculativeStats",
    "disable_speculative",
    "enable_speculative",
    "greedy_accept",
    "is_speculative_enabled",
    "rejection_sample",
    "self_draft",
    "speculative_generate",
    "use_kv4_cache_if_configured",
]
