"""Shared behaviour of our cache layers."""

from __future__ import annotations

import torch


class BatchMappedLayer:
    """Batch reshuffles and offloading of a cache layer that keeps its tensors behind ``self._map(fn)`` (a method
    the layer defines: ``fn`` applied to every tensor with a batch axis)."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        """Move every tensor to the CPU, remembering where they lived for :meth:`prefetch`."""
        devices = []

        def to_cpu(t: torch.Tensor) -> torch.Tensor:
            devices.append(t.device)
            return t.to("cpu", non_blocking=True)

        self._map(to_cpu)
        self._home = devices[0] if devices else None

    def prefetch(self) -> None:
        """Move the tensors back to the device :meth:`offload` found them on."""
        home = getattr(self, "_home", None)
        if home is not None:
            self._map(lambda t: t.to(home, non_blocking=True))


def own_layer(cache, index: int | None, layer_class: type, cache_name: str):
    """Layer ``index`` of ``cache`` (None without a cache), which must be a ``layer_class``: a model whose past is
    not keys and values cannot use another kind of cache."""
    if cache is None:
        return None
    layer = cache.layers[index] if index < len(cache.layers) else None
    if not isinstance(layer, layer_class):
        raise TypeError(f"layer {index} of the cache is a {type(layer).__name__}; this model needs a {cache_name} "
                        "(generate creates one).")
    return layer
