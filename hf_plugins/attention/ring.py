"""Ring self-attention (sequence parallelism): each rank holds a slice of the sequence, keys and values travel.

Every rank keeps the queries of its own tokens; key/value blocks rotate around the ring of ranks so each query
meets every key once, and softmax partials merge exactly through their log-sum-exp (Li et al., "Sequence
Parallelism: Long Sequence Training from System Perspective"; the online merge of Liu et al.'s Ring Attention).
The backward pass rotates the blocks again together with their key/value gradient accumulators, which end on the
rank that owns them. No rank ever holds the whole sequence.

Causality follows the tokens' global positions (the ``position_ids`` the model was given), so any split of the
sequence works; the zig-zag split of :mod:`hf_plugins.parallel.sequence` gives every rank the same causal work.
Tiles of queries and keys that lie wholly in the future are skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TILE = 512
"""Query/key tile length: bounds the ``[batch, heads, TILE, TILE]`` score block held at once."""


def _rotate(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Send ``tensors`` to the next rank of the ring and return the previous rank's (one batched exchange)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _tiles(positions: torch.Tensor):
    """``(slice, first position, last position)`` of each tile of a ``[length]`` position vector."""
    for start in range(0, positions.numel(), TILE):
        tile = positions[start : start + TILE]
        yield slice(start, start + tile.numel()), int(tile.min()), int(tile.max())


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, kv_heads, l, d]`` -> ``[b, kv_heads * groups, l, d]`` (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a partial softmax (``block_out``, ``block_lse``) into the running (``out``, ``lse``) in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.where(torch.isfinite(lse), torch.exp(lse - new_lse), torch.zeros_like(lse))
    take = torch.where(torch.isfinite(block_lse), torch.exp(block_lse - new_lse), torch.zeros_like(block_lse))
    out.mul_(keep[..., None]).add_(block_out * take[..., None])
    lse.copy_(new_lse)


def _scores(q, k, q_pos, k_pos, scale):
    """Masked scores ``[b, h, lq, lk]``: keys after a query's position are ``-inf``."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))


def _attend_block(q, k, v, q_pos, k_pos, scale, out, lse) -> None:
    """Merge the attention of queries ``q [b, h, lq, d]`` to one key/value block into ``out``/``lse``."""
    for qs, _, q_last in _tiles(q_pos):
        for ks, k_first, _ in _tiles(k_pos):
            if k_first > q_last:  # every key of the tile is in every query's future
                continue
            scores = _scores(q[:, :, qs], k[:, :, ks], q_pos[qs], k_pos[ks], scale)
            block_lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - torch.where(torch.isfinite(block_lse), block_lse, 0)[..., None])
            block_out = probs @ v[:, :, ks]
            _merge(out[:, :, qs], lse[:, :, qs], block_out, block_lse)


def _grad_block(q, k, v, q_pos, k_pos, scale, lse, grad_out, delta, grad_q, grad_k, grad_v) -> None:
    """Add one key/value block's contribution to ``grad_q`` and its own ``grad_k``/``grad_v`` (FlashAttention's
    backward: probabilities rebuilt from the final ``lse``, ``dS = P (dP - rowsum(dO O))``)."""
    for qs, _, q_last in _tiles(q_pos):
        for ks, k_first, _ in _tiles(k_pos):
            if k_first > q_last:
                continue
            scores = _scores(q[:, :, qs], k[:, :, ks], q_pos[qs], k_pos[ks], scale)
            probs = torch.exp(scores - lse[:, :, qs, None])
            grad_v[:, :, ks] += probs.transpose(-1, -2) @ grad_out[:, :, qs]
            grad_scores = probs * (grad_out[:, :, qs] @ v[:, :, ks].transpose(-1, -2) - delta[:, :, qs, None])
            grad_q[:, :, qs] += (grad_scores @ k[:, :, ks]) * scale
            grad_k[:, :, ks] += (grad_scores.transpose(-1, -2) @ q[:, :, qs]) * scale


class RingAttention(torch.autograd.Function):
    """``softmax(q k^T * scale, causal by position) v`` with k/v sharded over ``group``'s ranks."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, scale, group):
        groups = q.shape[1] // k.shape[1]
        compute = torch.promote_types(q.dtype, torch.float32)  # half inputs: fp32 math; float64 stays float64
        qf = q.to(compute)
        out = torch.zeros_like(qf)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=compute, device=q.device)
        block_k, block_v, block_pos = k, v, k_pos
        world = dist.get_world_size(group)
        for step in range(world):
            _attend_block(qf, _expand_heads(block_k.to(compute), groups), _expand_heads(block_v.to(compute), groups),
                          q_pos, block_pos, scale, out, lse)
            if step + 1 < world:
                block_k, block_v, block_pos = _rotate([block_k, block_v, block_pos], group)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, out, lse)
        ctx.scale, ctx.group, ctx.groups = scale, group, groups
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, k_pos, out, lse = ctx.saved_tensors
        scale, group, groups = ctx.scale, ctx.group, ctx.groups
        compute = out.dtype
        qf, grad_out = q.to(compute), grad_out.to(compute)
        delta = (grad_out * out).sum(-1)
        grad_q = torch.zeros_like(qf)
        block_k, block_v, block_pos = k, v, k_pos
        block_grad_k = torch.zeros(k.shape, dtype=compute, device=k.device)
        block_grad_v = torch.zeros_like(block_grad_k)
        world = dist.get_world_size(group)
        for step in range(world):
            expanded_k = _expand_heads(block_k.to(compute), groups)
            expanded_v = _expand_heads(block_v.to(compute), groups)
            grad_k = torch.zeros_like(expanded_k)
            grad_v = torch.zeros_like(expanded_v)
            _grad_block(qf, expanded_k, expanded_v, q_pos, block_pos, scale, lse, grad_out, delta, grad_q, grad_k,
                        grad_v)
            block_grad_k += grad_k.unflatten(1, (k.shape[1], groups)).sum(2)
            block_grad_v += grad_v.unflatten(1, (k.shape[1], groups)).sum(2)
            if step + 1 < world:
                block_k, block_v, block_pos, block_grad_k, block_grad_v = _rotate(
                    [block_k, block_v, block_pos, block_grad_k, block_grad_v], group)
        # Each accumulator travelled with its block; one more hop brings it home.
        if world > 1:
            block_grad_k, block_grad_v = _rotate([block_grad_k, block_grad_v], group)
        return grad_q.to(q.dtype), block_grad_k.to(k.dtype), block_grad_v.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
                   group: dist.ProcessGroup) -> torch.Tensor:
    """Causal attention over a sequence sharded across ``group``.

    Args:
        q: ``[batch, heads, local_len, head_dim]`` this rank's queries.
        k, v: ``[batch, kv_heads, local_len, head_dim]`` this rank's keys/values (``heads % kv_heads == 0``).
        positions: ``[local_len]`` global positions of this rank's tokens (the same for every batch row).
        scale: softmax scale.
        group: the sequence-parallel process group (every rank holds the same ``local_len``).

    Returns:
        ``[batch, heads, local_len, head_dim]``.
    """
    return RingAttention.apply(q, k, v, positions, positions, scale, group)


def ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           position_ids=None, sequence_group=None, **kwargs):
    """transformers attention function ``attn_implementation="ring_attention"``.

    The model is called with this rank's slice of the sequence, its global ``position_ids`` and
    ``sequence_group=`` the sequence-parallel process group (see :mod:`hf_plugins.parallel.sequence`). Returns
    ``(out [batch, local_len, heads, head_dim], None)``.
    """
    if sequence_group is None:
        raise ValueError(
            "ring_attention needs the sequence-parallel group: call the model with sequence_group=<ProcessGroup> "
            "(hf_plugins.parallel.sequence.shard_sequence prepares the inputs and positions)."
        )
    if position_ids is None:
        raise ValueError("ring_attention needs the global position_ids of this rank's tokens; pass position_ids=.")
    if dropout and module.training:
        raise ValueError(f"ring_attention does not implement attention dropout (got {dropout}); set it to 0.")
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) or getattr(module, unsupported, None):
            raise ValueError(f"ring_attention does not implement {unsupported}; use a full-attention model.")
    positions = position_ids[0]
    if position_ids.shape[0] > 1 and not bool((position_ids == positions).all()):
        raise ValueError("ring_attention takes the same positions for every row of the batch.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ring_attention(query, key, value, positions, scale, sequence_group)
    return out.transpose(1, 2).contiguous(), None


def ring_attention_mask(*args, attention_mask=None, **kwargs):
    """Mask function registered with ``ring_attention``: causality comes from global positions, so no mask is
    built; padded batches are refused (pack sequences instead)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ring_attention takes unpadded sequences: drop attention_mask (pack documents into full rows) or use "
            "another attn_implementation."
        )
    return None
