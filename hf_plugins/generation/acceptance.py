"""Verification of drafted tokens against the target: greedy matching and exact rejection sampling.

Both take the drafted tokens of every row and the target's scores at the ``k + 1`` verified positions, and return,
per row, how many drafts were accepted and the token that follows them (the target's correction at the first
rejected position, or its bonus token after ``k`` accepted drafts). Rows never interact, so a batch of rows with
different acceptance is verified in one call.
"""

from __future__ import annotations

import torch


def greedy_accept(draft_tokens: torch.Tensor, target_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest prefix of drafts equal to the target's argmax.

    Args:
        draft_tokens: ``[batch, k]`` drafted token ids.
        target_scores: ``[batch, k + 1, vocab]`` processed target scores; position ``j`` predicts draft ``j``.

    Returns:
        ``(accepted [batch], next_token [batch])``: ``next_token`` is the target's argmax after the accepted prefix,
        so the sequence grows by ``accepted + 1`` tokens, exactly those plain greedy decoding would produce.
    """
    target_tokens = target_scores.argmax(dim=-1)
    accepted = _prefix_length(draft_tokens == target_tokens[:, :-1])
    return accepted, target_tokens.gather(1, accepted[:, None]).squeeze(1)


def rejection_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al., Chen et al.): the output follows ``target_probs`` exactly.

    Draft ``j`` is accepted with probability ``min(1, p_j(x) / q_j(x))``. At the first rejection the next token is
    drawn from ``normalize(max(0, p_j - q_j))``; after ``k`` acceptances it is drawn from ``p_k``.

    Args:
        draft_tokens: ``[batch, k]`` tokens the draft sampled from ``draft_probs``.
        draft_probs: ``[batch, k, vocab]`` the draft's sampling distributions ``q_j``.
        target_probs: ``[batch, k + 1, vocab]`` the target's distributions ``p_j`` after the same processors.
        generator: optional RNG; the global one otherwise.

    Returns:
        ``(accepted [batch], next_token [batch])``.
    """
    batch, k = draft_tokens.shape
    index = draft_tokens[..., None]
    p_draft = target_probs[:, :k].gather(2, index).squeeze(2)
    q_draft = draft_probs.gather(2, index).squeeze(2)
    uniform = torch.rand(batch, k, device=draft_tokens.device, dtype=p_draft.dtype, generator=generator)
    # u < p/q written as u*q < p: no division by a zero draft probability (such a token was never drafted).
    accepted = _prefix_length(uniform * q_draft < p_draft)
    rows = torch.arange(batch, device=draft_tokens.device)
    p_next = target_probs[rows, accepted]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)[rows, accepted]
    residual = (p_next - q_next).clamp_min(0)
    # p == q leaves no residual mass; the position was then rejected with probability 0, so only the bonus
    # position (q = 0) reaches here with all mass, and the fallback to p is exact.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_next, residual)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return accepted, next_token


def _prefix_length(matches: torch.Tensor) -> torch.Tensor:
    """``[batch, k]`` bools -> ``[batch]`` number of leading Trues."""
    return matches.to(torch.long).cumprod(dim=1).sum(dim=1)
