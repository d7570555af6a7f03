"""A croppable recurrent-state cache for gated linear attention (GLA) layers, mixable with softmax-attention layers.

A GLA layer's past is one state ``[batch, heads, key_dim, value_dim]`` (plus the last ``conv_size - 1`` inputs of
its short convolutions), which cannot be sliced back like keys and values. To make ``crop`` exact (speculative
decoding rolls back rejected tokens, a draft rolls back its own drafted tokens), each layer keeps a *base*: the
state some tokens back, and the keys, values and gates of every token since. ``crop(-n)`` replays the kept tokens
but the last ``n`` from the base with the token-by-token recurrence decoding uses, so a rolled-back cache holds
the numbers plain decoding would have. The base moves up to the current state whenever keeping the new tokens
would exceed ``max_rollback_tokens`` (the latest update can always be rolled back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..kernels.gla import fused_recurrent_gla
from .cache_layers import BatchMappedLayer

MAX_ROLLBACK_TOKENS = 64
"""Default tokens a GLA layer can roll back (beyond its latest update): a draft's k steps plus a verification."""


@dataclass
class _Since:
    """The base (state and conv tail before the kept tokens) and the kept tokens' recurrence inputs."""

    state: torch.Tensor | None
    conv_tail: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor
    gates: torch.Tensor
    conv_inputs: torch.Tensor | None

    def map(self, fn) -> _Since:
        return _Since(*(None if t is None else fn(t) for t in (self.state, self.conv_tail, self.keys, self.values,
                                                              self.gates, self.conv_inputs)))

    def first(self, tokens: int) -> _Since:
        """The same base with only the first ``tokens`` kept tokens."""
        return _Since(self.state, self.conv_tail, self.keys[:, :tokens], self.values[:, :tokens],
                      self.gates[:, :tokens], None if self.conv_inputs is None else self.conv_inputs[..., :tokens])


def _cat(old: torch.Tensor | None, new: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    return None if new is None else torch.cat([old, new], dim=dim)


class GLAStateLayer(BatchMappedLayer, CacheLayerMixin):
    """One GLA layer's cache: ``state`` (float32 ``[batch, heads, key_dim, value_dim]``), ``conv_tail`` (the last
    ``conv_size - 1`` short-convolution inputs ``[batch, channels, conv_size - 1]``, or None) and the token count.

    The GLA layer reads them with :meth:`read` and stores its results with :meth:`commit`.

    Args:
        max_rollback_tokens: tokens kept for ``crop`` beyond the latest update (module docstring).
    """

    is_croppable = True
    is_sliding = False
    supports_early_init = False
    masks_past_slots = False  # a masked-out past token has already updated the state

    def __init__(self, max_rollback_tokens: int = MAX_ROLLBACK_TOKENS) -> None:
        super().__init__()
        self.max_rollback_tokens = max_rollback_tokens
        self.state: torch.Tensor | None = None
        self.conv_tail: torch.Tensor | None = None
        self.tokens = 0
        self.scale = 1.0
        self._since: _Since | None = None

    def lazy_initialization(self, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise TypeError("GLAStateLayer holds a recurrent state, not keys and values; the GLA layer uses read() and "
                        "commit().")

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(state, conv_tail)`` after the tokens seen so far (None before the first update)."""
        return self.state, self.conv_tail

    def commit(self, state: torch.Tensor, conv_tail: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
               gates: torch.Tensor, conv_inputs: torch.Tensor | None, scale: float) -> None:
        """Store the state after ``keys.shape[1]`` new tokens and what replaying them takes.

        Args:
            state: the new state; conv_tail: the new conv tail (or None without short convolutions).
            keys, gates: ``[batch, new_tokens, heads, key_dim]`` as the recurrence saw them; values likewise with
                ``value_dim``.
            conv_inputs: the convolutions' new inputs ``[batch, channels, new_tokens]`` or None.
            scale: the query scale (the replay's queries are dummies, but the recurrence takes one).
        """
        new = _Since(self.state, self.conv_tail, keys.detach(), values.detach(), gates.detach(),
                     None if conv_inputs is None else conv_inputs.detach())
        since = self._since
        if since is None or since.keys.shape[1] + keys.shape[1] > self.max_rollback_tokens:
            self._since = new
        else:
            self._since = _Since(since.state, since.conv_tail, _cat(since.keys, new.keys, 1),
                                 _cat(since.values, new.values, 1), _cat(since.gates, new.gates, 1),
                                 _cat(since.conv_inputs, new.conv_inputs, -1))
        self.state, self.conv_tail = state.detach(), None if conv_tail is None else conv_tail.detach()
        self.tokens += keys.shape[1]
        self.scale = scale
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``); at most the
        tokens kept since the base."""
        if tokens_to_remove > 0:
            raise ValueError(f"GLAStateLayer.crop takes a negative count of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        since = self._since
        kept = since.keys.shape[1]
        if -tokens_to_remove > kept:
            raise ValueError(f"GLAStateLayer can roll back {kept} tokens (max_rollback_tokens="
                             f"{self.max_rollback_tokens}, or the latest update if longer), asked for "
                             f"{-tokens_to_remove}; raise max_rollback_tokens.")
        since = since.first(kept + tokens_to_remove)
        self.state = since.state
        if since.keys.shape[1]:
            _, self.state = fused_recurrent_gla(since.keys, since.keys, since.values, since.gates, self.scale,
                                                initial_state=since.state, output_final_state=True)
        if since.conv_inputs is not None:
            self.conv_tail = conv_tail(since.conv_tail, since.conv_inputs, self.conv_tail.shape[-1])
        self.tokens += tokens_to_remove
        self._since = since

    def _map(self, fn) -> None:
        """Apply ``fn`` to every tensor with a batch axis."""
        self.state = None if self.state is None else fn(self.state)
        self.conv_tail = None if self.conv_tail is None else fn(self.conv_tail)
        self._since = None if self._since is None else self._since.map(fn)

    def reset(self) -> None:
        self.state, self.conv_tail, self._since = None, None, None
        self.tokens = 0
        self.is_initialized = False


def conv_tail(previous: torch.Tensor | None, inputs: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` convolution inputs ``[batch, channels, width]`` after ``previous`` then ``inputs``
    (zeros before the first token)."""
    if previous is None:
        previous = inputs.new_zeros(*inputs.shape[:-1], width)
    return torch.cat([previous, inputs], dim=-1)[..., -width:] if width else previous


class GLACache(Cache):
    """The cache of a GLA model: a :class:`GLAStateLayer` per GLA layer and a ``DynamicLayer`` per softmax-attention
    layer (``config.attn_layers``). Croppable, so speculative decoding works on it.

    Args:
        config: a ``GLAConfig`` (``num_hidden_layers``, ``attn_layers``).
        max_rollback_tokens: tokens each GLA layer can roll back beyond its latest update.
    """

    def __init__(self, config, max_rollback_tokens: int = MAX_ROLLBACK_TOKENS) -> None:
        attention = set(getattr(config, "attn_layers", None) or ())
        super().__init__(layers=[DynamicLayer() if i in attention else GLAStateLayer(max_rollback_tokens)
                                 for i in range(config.num_hidden_layers)])

