"""What a speculative run measured: acceptance, tokens per target forward, time spent drafting."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpeculativeStats:
    """Counters of one ``generate`` call; ``as_dict()`` is what ``return_dict_in_generate`` returns.

    ``drafted``/``accepted`` count draft tokens over all rows; ``emitted`` counts tokens each row received from
    verification steps (accepted drafts plus the target's own token); ``target_forwards`` counts verification
    forwards (one per step for the whole batch), excluding the prefill; ``row_forwards`` sums the unfinished rows
    each of them verified (finished rows leave the batch).
    """

    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    rows: int = 1
    target_forwards: int = 0
    row_forwards: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)

    def record_step(
        self, drafted: int, accepted: list[int], emitted: int, draft_seconds: float, verify_seconds: float
    ) -> None:
        """Count one verification step: ``drafted`` tokens for each live row, their ``accepted`` counts."""
        self.drafted += drafted * len(accepted)
        self.accepted += sum(accepted)
        self.emitted += emitted
        self.target_forwards += 1
        self.row_forwards += len(accepted)
        self.draft_lengths.append(drafted)
        self.draft_seconds += draft_seconds
        self.verify_seconds += verify_seconds

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean tokens a row gains per verification forward (1.0 means drafting bought nothing)."""
        return self.emitted / self.row_forwards if self.row_forwards else 0.0

    def as_dict(self) -> dict:
        """Counters plus the derived rates, JSON-ready."""
        out = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["tokens_per_target_forward"] = self.tokens_per_target_forward
        out["draft_fraction"] = self.draft_seconds / self.total_seconds if self.total_seconds else 0.0
        return out
