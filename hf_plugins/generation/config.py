"""User-facing options of speculative decoding."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculativeConfig:
    """How ``generate(assistant_model=...)`` drafts and verifies.

    Args:
        num_draft_tokens: ``"auto"`` adapts the draft length to the running acceptance rate and the measured
            draft/verify cost; an int fixes it.
        max_draft_tokens: upper bound of the adaptive draft length.
        initial_draft_tokens: the adaptive length before anything was measured.
        layer_parallel_group_size: EasySpec layer-parallel drafting: consecutive draft layers per group whose
            attention runs on the same input (1 = ordinary drafting). Lossless either way; larger groups draft
            faster and are accepted less often.
        fast_cpu_linears: on CPU, run the float linear layers of target and draft through oneDNN while decoding
            (about 1.8x faster for the few-row products of verification); plain ``generate`` is unaffected.
    """

    num_draft_tokens: int | str = "auto"
    max_draft_tokens: int = 12
    initial_draft_tokens: int = 4
    layer_parallel_group_size: int = 1
    fast_cpu_linears: bool = True

    def __post_init__(self) -> None:
        if self.num_draft_tokens != "auto" and not (isinstance(self.num_draft_tokens, int) and self.num_draft_tokens >= 1):
            raise ValueError(f"num_draft_tokens must be 'auto' or an int >= 1, got {self.num_draft_tokens!r}.")
        for name in ("max_draft_tokens", "initial_draft_tokens", "layer_parallel_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
