"""The decoding cache of Hyena models: every operator's input history, croppable by slicing.

A Hyena operator's output at a new token needs its long convolutions' whole input history (one dot product with
the filter per channel: O(context), no re-convolution) and its short convolution's last inputs. Both are kept per
layer as ``[batch, channels, tokens]`` tensors, so ``crop`` is a slice and speculative decoding rolls back exactly.
Memory per token and layer: ``(order + 1) d`` projected values plus ``(order - 1) d`` long-convolution inputs (a
softmax layer's KV cache holds ``2 d``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_layers import BatchMappedLayer


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=-1)


class HyenaStateLayer(BatchMappedLayer, CacheLayerMixin):
    """One Hyena operator's history: ``projected [batch, (order + 1) d, tokens]`` (the short convolution's inputs)
    and ``inputs[i] [batch, d, tokens]`` (long convolution ``i``'s inputs)."""

    is_croppable = True
    is_sliding = False
    supports_early_init = False
    masks_past_slots = False  # a masked-out slot would still shift every later token's lags in the convolutions

    def __init__(self) -> None:
        super().__init__()
        self.projected: torch.Tensor | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self._filters: torch.Tensor | None = None

    def lazy_initialization(self, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise TypeError("HyenaStateLayer holds input histories, not keys and values; the Hyena operator uses "
                        "short_tail(), extend() and commit_short().")

    def short_tail(self, new: torch.Tensor, width: int) -> torch.Tensor:
        """The ``width`` projected inputs before ``new [batch, channels, tokens]`` (zeros before the first)."""
        if self.projected is None:
            return new.new_zeros(*new.shape[:-1], width)
        tail = self.projected[..., max(0, self.projected.shape[-1] - width):]
        return torch.cat([new.new_zeros(*new.shape[:-1], width - tail.shape[-1]), tail], dim=-1) if width else tail

    def filters(self, compute) -> torch.Tensor:
        """The operator's long filters for this generation: ``compute()`` on the first call, then the same tensor
        (the parameters do not change while a cache is in use)."""
        if self._filters is None:
            self._filters = compute().detach()
        return self._filters

    def extend(self, index: int, new: torch.Tensor) -> torch.Tensor:
        """Append ``new [batch, d, tokens]`` to long convolution ``index``'s history and return all of it."""
        self.inputs[index] = _append(self.inputs.get(index), new.detach())
        return self.inputs[index]

    def commit_short(self, projected: torch.Tensor, width: int) -> None:
        """Record the new tokens' projected inputs (after every long convolution has been extended)."""
        self.projected = _append(self.projected, projected.detach())
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0 if self.projected is None else self.projected.shape[-1]

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"HyenaStateLayer.crop takes a negative count of tokens to remove, got "
                             f"{tokens_to_remove}.")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove])

    def _map(self, fn) -> None:
        self.projected = None if self.projected is None else fn(self.projected)
        self.inputs = {i: fn(t) for i, t in self.inputs.items()}

    def reset(self) -> None:
        self.projected, self.inputs, self._filters = None, {}, None
        self.is_initialized = False


class HyenaCache(Cache):
    """The cache of a Hyena model: a :class:`HyenaStateLayer` per block; croppable (speculative decoding works).

    Args:
        config: a ``HyenaConfig`` (``num_hidden_layers``).
    """

    def __init__(self, config) -> None:
        super().__init__(layers=[HyenaStateLayer() for _ in range(config.num_hidden_layers)])
