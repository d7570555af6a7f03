"""Draft-model candidate generation behind transformers' ``CandidateGenerator`` interface.

Sequences live in *slots*: every row shares one slot index per position, and a row that accepted fewer drafts
than another keeps masked *holes* where its rejected drafts were. That lets rows of a batch accept different
numbers of tokens while the draft and target caches stay rectangular tensors cropped by one length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator

from .cache_ops import crop_to, mask_or_none, new_cache, positions_from_mask
from .layer_parallel import layer_parallel_draft

TokenChooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, None]:
    return logits.argmax(dim=-1), None


class DraftModelCandidates(CandidateGenerator):
    """Drafts ``k`` tokens per row with a small causal LM sharing the target's vocabulary.

    With ``layer_parallel_group_size > 1`` drafting follows EasySpec (Wu et al., 2025): after the first draft token,
    each group of consecutive draft layers runs its attention sublayers on the group's input in one batched
    computation ("fuzzy" drafting), and after verification the draft cache is recomputed exactly for the accepted
    tokens in the single forward pass that also drafts the next first token, so fuzzy errors never accumulate.

    Args:
        draft_model: the draft causal LM (``eval`` mode), on the target's device.
        vocab_size: the target's vocabulary size; draft logits are cut or padded (with -inf) to it.
        layer_parallel_group_size: draft layers per fuzzy group (1 = ordinary sequential drafting).
        draft_context: the draft sees only the last ``draft_context`` prompt slots (None: all). Its prefill then
            costs ``draft_context`` positions per row instead of the whole prompt; the target still sees everything,
            so outputs are unchanged and only acceptance can move.
    """

    def __init__(self, draft_model: PreTrainedModel, vocab_size: int, layer_parallel_group_size: int = 1,
                 draft_context: int | None = None) -> None:
        self.draft_model = draft_model
        self.draft_context = draft_context
        self._offset: int | None = None  # first slot the draft sees, fixed at the first call
        self.vocab_size = vocab_size
        self.cache = new_cache(draft_model)
        grouped = layer_parallel_group_size > 1
        self.fuzzy = layer_parallel_draft(draft_model, layer_parallel_group_size) if grouped else None
        self.num_tokens = 4
        self.chooser: TokenChooser = _greedy
        self._exact_slots = 0  # leading slots whose draft KV entries are exact

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """``input_ids [batch, slots]`` -> ``([batch, slots + k] candidates, [batch, k, vocab] probs or None)``.

        ``attention_mask [batch, slots]`` marks padding and holes and ``position_ids [batch, slots]`` holds each
        slot's position (both derived as in ``generate`` when omitted, as in batch-1 assisted generation).
        Probabilities are returned when the chooser samples (for rejection sampling).
        """
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = position_ids if position_ids is not None else positions_from_mask(mask)
        if self._offset is None:
            self._offset = max(0, input_ids.shape[1] - self.draft_context) if self.draft_context else 0
        # Slots never move once written, so cutting the same leading slots every call keeps the draft cache aligned.
        seen, mask, positions = input_ids[:, self._offset :], mask[:, self._offset :], positions[:, self._offset :]
        slots = seen.shape[1]
        crop_to(self.cache, self._exact_slots)
        logits = self._forward(seen[:, self._exact_slots :], mask, positions[:, self._exact_slots :], exact=True)
        tokens, probs = [], []
        for step in range(self.num_tokens):
            token, prob = self.chooser(self._fit_vocab(logits))
            tokens.append(token)
            probs.append(prob)
            if step + 1 == self.num_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = positions[:, -1:] + step + 1
            logits = self._forward(token[:, None], mask, position, exact=self.fuzzy is None)
        self._exact_slots = slots if self.fuzzy is not None else slots + self.num_tokens - 1
        drafts = torch.stack(tokens, dim=1)
        draft_probs = torch.stack(probs, dim=1) if probs[0] is not None else None
        return torch.cat([input_ids, drafts], dim=1), draft_probs

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches) -> None:
        """After verification: keep the draft cache only up to the slot before the new pending token.

        ``input_ids [batch, slots']`` is the new slot layout; its last slot (the target's token) and any slot the
        draft never saw are recomputed by the next ``get_candidates``.
        """
        self._exact_slots = min(self._exact_slots, input_ids.shape[1] - (self._offset or 0) - 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the draft cache's ``rows [n]`` (the target dropped its finished rows)."""
        self.cache.batch_select_indices(rows)

    def _forward(self, new_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, exact: bool) -> torch.Tensor:
        """Run the draft on the last ``new_ids.shape[1]`` slots of ``mask``; ``[batch, vocab]`` last logits."""
        if not exact:
            return self.fuzzy.step(new_ids, positions, mask, self.cache)
        out = self.draft_model(
            input_ids=new_ids,
            attention_mask=mask_or_none(mask),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        if width == self.vocab_size:
            return logits
        if width > self.vocab_size:
            return logits[..., : self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.vocab_size - width), float("-inf"))
        return torch.cat([logits, pad], dim=-1)
