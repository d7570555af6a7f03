"""How many tokens to draft next: chosen from the running acceptance rate and the measured step costs."""

from __future__ import annotations

from collections import deque

import torch


class DraftLengthPolicy:
    """Picks the draft length ``k`` that maximises expected tokens per second; 0 means a plain decoding step.

    With per-token acceptance rate ``a`` a step yields ``(1 - a^(k+1)) / (1 - a)`` tokens per row on average
    (Leviathan et al., 2023). Its time is modelled as ``v0 + v1 k`` for verification plus ``d0 + d1 k`` for drafting
    (``k >= 1``), each fitted by least squares to the recent steps' measured times: the slopes hold the draft tokens
    and the extra verified positions, which matter once verification stops being memory-bound (large batches, CPUs),
    and ``d0`` the draft's catch-up pass. Until two different lengths have been seen a slope is taken as the measured
    time per token. When no ``k >= 1`` beats a plain step (``1 / v0``) the policy decodes plainly and tries ``k = 1``
    every ``explore_every`` steps to follow the acceptance rate. ``a`` is the maximum-likelihood estimate of a
    truncated geometric law from exponentially decayed counts of accepted and rejected drafts. ``fixed`` pins ``k``.
    """

    def __init__(self, initial: int = 4, maximum: int = 12, fixed: int | None = None, decay: float = 0.8,
                 history: int = 32, explore_every: int = 8) -> None:
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
        self._steps: deque[tuple[int, float, float]] = deque(maxlen=history)
        self.explore_every = explore_every
        self._plain_steps = 0

    @property
    def acceptance_rate(self) -> float:
        """Running per-token acceptance estimate (0.5 before any observation)."""
        total = self._accepted + self._rejected
        return self._accepted / total if total > 0 else 0.5

    def update(self, accepted: torch.Tensor, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record one step: ``accepted [rows]`` drafts kept of ``drafted`` per row, and the phases' wall times."""
        self._accepted = self.decay * self._accepted + float(accepted.sum())
        self._rejected = self.decay * self._rejected + float((accepted < drafted).sum())
        self._steps.append((drafted, draft_seconds, verify_seconds))
        if self.fixed is not None:
            return
        self._plain_steps = self._plain_steps + 1 if drafted == 0 else 0
        verify0, verify1, draft0, draft1 = self.step_cost()
        self.current = best_draft_length(self.acceptance_rate, verify0, verify1, draft0, draft1, self.maximum)
        if self.current == 0 and self._plain_steps >= self.explore_every:
            self.current = 1

    def step_cost(self) -> tuple[float, float, float, float]:
        """``(v0, v1, d0, d1)``: fitted verification ``v0 + v1 k`` and drafting ``d0 + d1 k`` seconds."""
        verify0, verify1 = _fit([(k, v) for k, _, v in self._steps], per_token_if_unknown=False)
        drafting = [(k, d) for k, d, _ in self._steps if k > 0]
        draft0, draft1 = _fit(drafting, per_token_if_unknown=True) if drafting else (0.0, 0.0)
        return verify0, verify1, draft0, draft1


def _fit(points: list[tuple[int, float]], per_token_if_unknown: bool) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``time = intercept + slope k``, both kept >= 0.

    With a single ``k`` the split is assumed: verification as a constant (memory-bound weights streaming), drafting
    as all per token.
    """
    n = len(points)
    mean_k = sum(k for k, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    if spread > 0:
        slope = sum((k - mean_k) * (t - mean_t) for k, t in points) / spread
    else:
        slope = mean_t / mean_k if per_token_if_unknown and mean_k > 0 else 0.0
    slope = max(slope, 0.0)
    return max(mean_t - slope * mean_k, 0.0), slope


def best_draft_length(acceptance: float, verify0: float, verify1: float, draft0: float, draft1: float,
                      maximum: int) -> int:
    """The ``k`` in ``0..maximum`` with the most expected tokens per second.

    ``k = 0`` is a plain step (one token per ``verify0`` seconds); ``k >= 1`` yields ``(1 - a^(k+1)) / (1 - a)``
    tokens in ``verify0 + verify1 k + draft0 + draft1 k`` seconds.
    """
    a = min(max(acceptance, 1e-3), 0.999)

    def speed(k: int) -> float:
        if k == 0:
            return 1.0 / max(verify0, 1e-12)
        seconds = verify0 + verify1 * k + draft0 + draft1 * k
        return (1 - a ** (k + 1)) / ((1 - a) * max(seconds, 1e-12))

    return max(range(0, maximum + 1), key=speed)
