"""Speculative decoding: ``generate(assistant_model=...)`` through our lossless batched loop, EasySpec drafting,
self-drafts and acceptance metrics."""

from __future__ import annotations

from .acceptance import greedy_accept, rejection_sample
from .config import SpeculativeConfig
from .drafting import DraftModelCandidates
from .enable import disable_speculative, enable_speculative, is_speculative_enabled
from .loop import SpeculativeGenerateOutput, speculative_generate
from .self_draft import self_draft
from .stats import SpeculativeStats

__all__ = [
    "DraftModelCandidates",
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
]
