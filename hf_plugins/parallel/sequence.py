"""Sequence parallelism helpers: zig-zag sharding of token rows and the loss over a sharded sequence.

A sequence of ``n`` tokens is padded to a multiple of ``2 x world`` and cut into ``2 x world`` chunks; rank ``r``
keeps chunks ``r`` and ``2 world - 1 - r``, so every rank gets the same share of causal attention work (an early
chunk sees few keys, its partner many). Padding tokens sit after the sequence (no real token attends to them)
and carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice of a sequence.

    Fields:
        index: ``[local_len]`` which padded global positions this rank holds (also its ``position_ids``).
        valid: ``[local_len]`` bool, False on padding.
        length: the unpadded sequence length.
    """

    index: torch.Tensor
    valid: torch.Tensor
    length: int

    def take(self, tokens: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """``[batch, length]`` -> ``[batch, local_len]`` this rank's tokens (``pad`` on padding)."""
        padded = F.pad(tokens, (0, int(self.index.max()) + 1 - tokens.shape[1]), value=pad)
        return padded[:, self.index]

    def position_ids(self, batch: int) -> torch.Tensor:
        """``[batch, local_len]`` global positions for the model (RoPE and the ring's causality)."""
        return self.index[None].expand(batch, -1)


def zigzag_shard(length: int, rank: int, world: int, device=None) -> SequenceShard:
    """The zig-zag :class:`SequenceShard` of a ``length``-token sequence for ``rank`` of ``world``."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}.")
    chunks = 2 * world
    chunk = -(-length // chunks)
    starts = [rank * chunk, (chunks - 1 - rank) * chunk]
    index = torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])
    return SequenceShard(index=index, valid=index < length, length=length)


def shard_for_group(length: int, group: dist.ProcessGroup, device=None) -> SequenceShard:
    """:func:`zigzag_shard` for this rank of ``group``."""
    return zigzag_shard(length, dist.get_rank(group), dist.get_world_size(group), device)


def sharded_next_token_loss(logits: torch.Tensor, targets: torch.Tensor, shard: SequenceShard,
                            group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole sharded sequence.

    ``logits [batch, local_len, vocab]`` and ``targets [batch, local_len]`` are this rank's (targets taken from the
    globally shifted sequence). Returns ``sum(local losses) / (global token count)`` times the group size, so that
    averaging gradients over the group (what DDP does) gives the gradient of the global mean.
    """
    mask = shard.valid[None].expand_as(targets)
    losses = F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), targets.flatten(), reduction="none")
    local_sum = (losses * mask.flatten()).sum()
    count = torch.tensor(float(mask.sum()), device=logits.device)
    dist.all_reduce(count, group=group)
    return local_sum * dist.get_world_size(group) / count


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the loss; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
