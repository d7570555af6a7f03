"""How many tokens to draft next: chosen from the running acceptance rate and the measured draft/verify costs."""

from __future__ import annotations

import torch


class DraftLengthPolicy:
    """Picks the draft length ``k`` that maximises expected tokens per unit of time.

    With per-token acceptance rate ``a`` a step yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average (Leviathan
    et al., 2023) and costs ``k * c + 1`` target forwards, ``c`` being one draft token's time over one verification's.
    ``a`` is the maximum-likelihood estimate of a truncated geometric law from exponentially decayed counts of
    accepted and rejected drafts; ``c`` is an exponential average of measured times. ``fixed`` pins ``k``.
    """

    def __init__(self, initial: int = 4, maximum: int = 12, fixed: int | None = None, decay: float = 0.8) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"num_draft_tokens must be >= 1 or 'auto', got {fixed}.")
        if maximum < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {maximum}.")
        self.fixed = fixed
        self.maximum = maximum
        self.decay = decay
        self.current = fixed if fixed is not None else min(initial, maximum)
        self._accepted = 0.0
        self._rejected = 0.0
        self._draft_cost: float | None = None

    @property
    def acceptance_rate(self) -> float:
        """Running per-token acceptance estimate (0.5 before any observation)."""
        total = self._accepted + self._rejected
        return self._accepted / total if total > 0 else 0.5

    def update(self, accepted: torch.Tensor, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record one step: ``accepted [rows]`` drafts kept of ``drafted`` per row, and the phases' wall times."""
        n_accepted = float(accepted.sum())
        n_rejected = float((accepted < drafted).sum())
        self._accepted = self.decay * self._accepted + n_accepted
        self._rejected = self.decay * self._rejected + n_rejected
        if verify_seconds > 0 and drafted > 0:
            cost = draft_seconds / drafted / verify_seconds
            self._draft_cost = cost if self._draft_cost is None else 0.7 * self._draft_cost + 0.3 * cost
        if self.fixed is None and self._draft_cost is not None:
            self.current = best_draft_length(self.acceptance_rate, self._draft_cost, self.maximum)


def best_draft_length(acceptance: float, draft_cost: float, maximum: int) -> int:
    """``argmax_k (1 - a^(k+1)) / ((1 - a) (k c + 1))`` over ``1..maximum``."""
    a = min(max(acceptance, 1e-3), 0.999)

    def speed(k: int) -> float:
        return (1 - a ** (k + 1)) / ((1 - a) * (k * draft_cost + 1))

    return max(range(1, maximum + 1), key=speed)
