"""Per-row output of a batched speculative run: tokens as plain ``generate`` would return them, and stopping."""

from __future__ import annotations

import torch


class OutputRows:
    """Each row's left-padded prompt plus its generated tokens, its length and whether it is done.

    Args:
        input_ids: ``[batch, prompt]``.
        max_length: ``generate``'s max_length (prompt + max_new_tokens).
        eos: end-of-sequence ids (``[n]``) or None.
        pad: the id rows that stop early are padded with.
        extra_stops: the stopping criteria other than max length / EOS (stop strings ...), or None.
    """

    def __init__(self, input_ids: torch.Tensor, max_length: int, eos: torch.Tensor | None, pad: int, extra_stops) -> None:
        batch, prompt = input_ids.shape
        self.tokens = input_ids.new_full((batch, max_length), pad)
        self.tokens[:, :prompt] = input_ids
        self.lengths = [prompt] * batch
        self.done = [False] * batch
        self.max_length = max_length
        self.eos = set(eos.tolist()) if eos is not None else set()
        self.extra_stops = extra_stops

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def prefix(self, row: int) -> torch.Tensor:
        """``[length]`` the row's tokens so far (what plain decoding's processors would see)."""
        return self.tokens[row, : self.lengths[row]]

    def prefixes(self, rows: list[int]) -> list[torch.Tensor]:
        return [self.prefix(row) for row in rows]

    def remaining(self) -> int:
        """The most tokens any unfinished row may still take."""
        return max(self.max_length - n for n, done in zip(self.lengths, self.done) if not done)

    def append(self, row: int, new_tokens: list[int]) -> list[int]:
        """Append tokens to an unfinished row up to EOS / max length / a stop criterion; returns those kept."""
        kept = []
        for token in new_tokens:
            if self.done[row]:
                break
            self.tokens[row, self.lengths[row]] = token
            self.lengths[row] += 1
            kept.append(token)
            if token in self.eos or self.lengths[row] >= self.max_length or self._stopped(row):
                self.done[row] = True
        return kept

    def _stopped(self, row: int) -> bool:
        if self.extra_stops is None:
            return False
        return bool(self.extra_stops(self.prefix(row)[None], None).any())

    def sequences(self) -> torch.Tensor:
        """``[batch, longest]`` every row, padded after its end like plain ``generate``."""
        return self.tokens[:, : max(self.lengths)]
