"""How many tokens to draft next: chosen from the running acceptance rate and the measured step costs."""

from __future__ import annotations

import statistics
from collections import deque

import torch


class DraftLengthPolicy:
    """Picks the draft length ``k`` that maximises expected tokens per second; 0 means a plain decoding step.

    With per-token acceptance rate ``a`` a step yields ``(1 - a^(k+1)) / (1 - a)`` tokens per row on average
    (Leviathan et al., 2023). Its time is modelled as ``v0 + v1 k`` for verification plus ``d k`` for drafting:

    - ``d`` is the median measured drafting time per drafted token (one draft forward each; the first step, whose
      draft pass is the draft's prefill over the whole prompt, is left out, and ``k`` stays at ``initial`` until
      a second drafting step was measured);
    - ``v1`` is fitted by least squares over drafting steps once their lengths spread over at least
      ``MIN_SPREAD`` (it matters when verification stops being memory-bound: large batches, CPUs), else 0;
    - ``v0`` is the fit's intercept; a plain step's time ``p`` is measured separately (one verified position often
      takes another, faster kernel path than two or more), and taken as ``v0`` until a plain step was seen.

    One plain step after ``PROBE_PLAIN_AFTER`` drafting steps measures ``p``. Plain steps are chosen only when
    they beat every ``k >= 1`` by ``PLAIN_MARGIN`` (large batches on CPUs, weak drafts), and
    after ``explore_every`` of them ``k = 1`` is tried again to follow the acceptance rate. ``a`` is the
    maximum-likelihood estimate of a truncated geometric law from exponentially decayed counts of accepted and
    rejected drafts. ``fixed`` pins ``k``.
    """

    MIN_SPREAD = 2
    PLAIN_MARGIN = 1.1
    PROBE_PLAIN_AFTER = 2  # drafting steps before one plain step measures ``p``

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
        self._drafting: deque[tuple[int, float, float]] = deque(maxlen=history)
        self._prefill_seen = False  # the first drafting step runs the draft's prefill: not a cost sample
        self._plain: deque[float] = deque(maxlen=history)
        self.explore_every = explore_every
        self._plain_run = 0

    @property
    def acceptance_rate(self) -> float:
        """Running per-token acceptance estimate (0.5 before any observation)."""
        total = self._accepted + self._rejected
        return self._accepted / total if total > 0 else 0.5

    def update(self, accepted: torch.Tensor, drafted: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record one step: ``accepted [rows]`` drafts kept of ``drafted`` per row, and the phases' wall times."""
        self._accepted = self.decay * self._accepted + float(accepted.sum())
        self._rejected = self.decay * self._rejected + float((accepted < drafted).sum())
        if drafted == 0:
            self._plain.append(verify_seconds)
            self._plain_run += 1
        else:
            if not self._prefill_seen:
                self._prefill_seen = True
            else:
                self._drafting.append((drafted, draft_seconds, verify_seconds))
            self._plain_run = 0
        if self.fixed is not None or not self._drafting:  # keep the initial length until a regular step is seen
            return
        self.current = best_draft_length(self.acceptance_rate, *self.step_cost(), self.maximum, self.PLAIN_MARGIN)
        if self.current == 0 and self._plain_run >= self.explore_every:
            self.current = 1
        if not self._plain and len(self._drafting) == self.PROBE_PLAIN_AFTER:
            self.current = 0

    def reset_costs(self) -> None:
        """Forget the measured step times (the batch shrank, so they no longer hold); keep the acceptance rate.

        Drafting resumes with the current length (1 after plain steps) and a plain step is probed again.
        """
        self._drafting.clear()
        self._plain.clear()
        self._plain_run = 0
        if self.fixed is None:
            self.current = max(self.current, 1)

    def step_cost(self) -> tuple[float, float, float, float]:
        """``(p, v0, v1, d)``: a plain step's seconds (``v0`` until one was measured), verification ``v0 + v1 k``
        seconds and drafting ``d`` seconds per token."""
        steps = list(self._drafting)
        ks = [k for k, _, _ in steps]
        verify = [v for _, _, v in steps]
        mean_k, mean_v = sum(ks) / len(ks), sum(verify) / len(verify)
        per_token = statistics.median(d / k for k, d, _ in steps)
        slope = 0.0
        if max(ks) - min(ks) >= self.MIN_SPREAD:
            spread = sum((k - mean_k) ** 2 for k in ks)
            slope = max(sum((k - mean_k) * (v - mean_v) for k, v in zip(ks, verify)) / spread, 0.0)
        intercept = max(mean_v - slope * mean_k, 0.0)
        # A plain step verifies one position, which many kernels run on another (faster) path than two or more.
        plain = sum(self._plain) / len(self._plain) if self._plain else intercept
        return plain, intercept, slope, per_token


def best_draft_length(acceptance: float, plain: float, verify0: float, verify1: float, draft: float, maximum: int,
                      plain_margin: float = 1.0) -> int:
    """The ``k`` in ``0..maximum`` with the most expected tokens per second.

    ``k >= 1`` yields ``(1 - a^(k+1)) / (1 - a)`` tokens in ``verify0 + (verify1 + draft) k`` seconds; ``k = 0`` (a
    plain step, one token per ``plain`` seconds) wins only by a factor ``plain_margin``.
    """
    a = min(max(acceptance, 1e-3), 0.999)

    def speed(k: int) -> float:
        return (1 - a ** (k + 1)) / ((1 - a) * max(verify0 + (verify1 + draft) * k, 1e-12))

    best = max(range(1, maximum + 1), key=speed)
    return 0 if 1.0 / max(plain, 1e-12) > plain_margin * speed(best) else best
