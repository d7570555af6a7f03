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
        draft_context: the draft reads only the last ``draft_context`` prompt tokens (None: the whole prompt).
            Cuts the draft's prefill, which dominates drafting cost for long prompts and large batches; the
            target reads everything, so outputs are unchanged.
        fast_cpu_linears: on CPU, run the float linear layers of target and draft through the faster of oneDNN
            and ``F.linear`` per layer shape and row count, measured once per machine (oneDNN wins on wide layers
            and few rows, loses on narrow ones); plain ``generate`` is unaffected.
    """

    num_draft_tokens: int | str = "auto"
    max_draft_tokens: int = 12
    initial_draft_tokens: int = 4
    layer_parallel_group_size: int = 1
    draft_context: int | None = None
    fast_cpu_linears: bool = True

    def __post_init__(self) -> None:
        tokens = self.num_draft_tokens
        if tokens != "auto" and not (isinstance(tokens, int) and tokens >= 1):
            raise ValueError(f"num_draft_tokens must be 'auto' or an int >= 1, got {tokens!r}.")
        for name in ("max_draft_tokens", "initial_draft_tokens", "layer_parallel_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        context = self.draft_context
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
            raise ValueError(f"draft_context must be None (the whole prompt) or an int >= 1, got {context!r}.")
