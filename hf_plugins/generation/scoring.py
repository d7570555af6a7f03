"""Turning model logits into scores and tokens the way ``generate`` would, at several positions at once."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# Processors whose output depends on the scores alone, not on the tokens before them: these can score every
# drafted position of every row in one call. Any other processor is called per row and position with the exact
# prefix plain decoding would have shown it.
_PREFIX_FREE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    SuppressTokensLogitsProcessor,
    InfNanRemoveLogitsProcessor,
)


def prefix_free(processors: LogitsProcessorList) -> LogitsProcessorList:
    """The processors of ``processors`` that ignore the prefix (temperature, top-k/p ...), in order."""
    return LogitsProcessorList(p for p in processors if isinstance(p, _PREFIX_FREE))


def score_positions(
    processors: LogitsProcessorList,
    logits: torch.Tensor,
    prefixes: list[torch.Tensor],
    continuations: torch.Tensor,
) -> torch.Tensor:
    """Processed fp32 scores at ``L`` consecutive positions of every row.

    Args:
        processors: ``generate``'s prepared processors (warpers included).
        logits: ``[batch, L, vocab]`` raw logits; position ``j`` follows ``prefix + continuations[:, :j]``.
        prefixes: per row, ``[len_i]`` the tokens plain decoding would have as ``input_ids`` at position 0.
        continuations: ``[batch, L - 1]`` the tokens between positions (the drafts).

    Returns:
        ``[batch, L, vocab]`` float32 scores.
    """
    scores = logits.float()
    if not processors:
        return scores
    batch, length, vocab = scores.shape
    if all(isinstance(p, _PREFIX_FREE) for p in processors):
        dummy = continuations.new_zeros(batch * length, 1)
        return processors(dummy, scores.reshape(batch * length, vocab)).view(batch, length, vocab)
    out = torch.empty_like(scores)
    for row, prefix in enumerate(prefixes):
        for pos in range(length):
            ids = torch.cat([prefix, continuations[row, :pos]])[None]
            out[row, pos] = processors(ids, scores[row, pos][None].clone())[0]
    return out


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scores [..., vocab]`` -> ``(tokens [...], probs [..., vocab] or None)``: argmax, or a sample and its law."""
    if not do_sample:
        return scores.argmax(dim=-1), None
    probs = scores.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs
