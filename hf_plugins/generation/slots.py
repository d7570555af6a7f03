"""The slot layout shared by target and draft caches: one column per position, masked holes for rejected drafts.

After a verification step every row appends the same number of slots, ``longest + 1``: its accepted drafts, holes
up to the batch's longest acceptance, and its next token. Caches therefore stay rectangular and are rolled back by
one crop, while attention masks and position ids make every row see exactly its own tokens.
"""

from __future__ import annotations

import torch


class SlotLayout:
    """``tokens``, ``mask`` and ``positions``, each ``[batch, slots]``; the last slot is the pending token.

    Args:
        input_ids: ``[batch, prompt]`` the prompt (left-padded in batches).
        mask: ``[batch, prompt]`` 0 on padding.
        positions: ``[batch, prompt]`` position ids as ``generate`` made them.
    """

    def __init__(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.tokens, self.mask, self.positions = input_ids, mask, positions

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def append_pending(self, token: torch.Tensor) -> None:
        """Add ``token [batch]`` (the target's next token) as the new pending slot, one position past the last."""
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, 1)], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)

    def verification(self, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target inputs for ``drafts [batch, k]``: ``(ids [batch, k+1], mask [batch, slots+k], positions [batch, k+1])``."""
        k = drafts.shape[1]
        ids = torch.cat([self.tokens[:, -1:], drafts], dim=1)
        mask = torch.cat([self.mask, self.mask.new_ones(self.batch, k)], dim=1)
        positions = self.positions[:, -1:] + torch.arange(k + 1, device=self.positions.device)
        return ids, mask, positions

    def accept(self, drafts: torch.Tensor, accepted: torch.Tensor, next_token: torch.Tensor, longest: int) -> None:
        """Append ``longest`` draft slots (holes past each row's ``accepted``) and the new pending ``next_token``."""
        steps = torch.arange(longest, device=self.mask.device)
        kept = (steps[None] < accepted[:, None]).to(self.mask.dtype)
        last = self.positions[:, -1:]
        self.tokens = torch.cat([self.tokens, drafts[:, :longest], next_token[:, None]], dim=1)
        self.mask = torch.cat([self.mask, kept, self.mask.new_ones(self.batch, 1)], dim=1)
        self.positions = torch.cat([self.positions, last + 1 + steps, last + 1 + accepted[:, None]], dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows [n]`` (indices into the batch), in that order."""
        self.tokens, self.mask, self.positions = self.tokens[rows], self.mask[rows], self.positions[rows]

    @property
    def cached(self) -> int:
        """Slots a cache should hold between steps: all but the pending one."""
        return self.tokens.shape[1] - 1
