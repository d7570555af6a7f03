"""Shared behaviour of our cache layers."""

from __future__ import annotations

import torch


class BatchMappedLayer:
    """Batch reshuffles of a cache layer that keeps its tensors behind ``self._map(fn)`` (``fn`` applied to every
    tensor with a batch axis first)."""

    def _map(self, fn) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
