"""A 4-bit KV cache: keys and values stored as packed 4-bit codes with a scale and a minimum per token, head and
group of head-dimension channels; croppable and row-selectable, so speculative decoding and batches work on it.

Per-token groups make every appended token final the moment it is written (no residual float window), so
``crop`` is a slice and the cache holds exactly what it would hold had the rejected tokens never been appended.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

CODE_MAX = 15


def quantize_kv(states: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[batch, heads, tokens, head_dim]`` -> ``(uint8 codes [.., head_dim / 2], fp16 scales and minima
    [.., head_dim / group_size])``: asymmetric round-to-nearest per group; ``x ~ code * scale + minimum``."""
    *lead, head_dim = states.shape
    grouped = states.float().reshape(*lead, head_dim // group_size, group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    # The stored (fp16) scale and minimum are the ones the codes are computed against: dequantizing is exact to them.
    minimum = low.half()
    scale = ((high - minimum.float()) / CODE_MAX).clamp_min(torch.finfo(torch.float16).tiny).half()
    codes = torch.round((grouped - minimum.float()[..., None]) / scale.float()[..., None]).clamp(0, CODE_MAX)
    codes = codes.to(torch.uint8).reshape(*lead, head_dim)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, minimum


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv` up to rounding: ``[batch, heads, tokens, head_dim]`` in ``dtype``."""
    *lead, half = codes.shape
    values = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(*lead, scale.shape[-1], -1).float()
    values = values * scale.float()[..., None] + minimum.float()[..., None]
    return values.reshape(*lead, 2 * half).to(dtype)


class KV4Layer(DynamicLayer):
    """One attention layer's 4-bit cache. ``update`` appends the new tokens' codes and returns the whole
    dequantized K and V ``[batch, kv_heads, tokens, head_dim]`` in the model's dtype.

    Args:
        group_size: head-dimension channels per scale and minimum (clipped to the head dimension, which it must
            divide).
    """

    is_croppable = True

    def __init__(self, group_size: int = 64) -> None:
        super().__init__()
        self.group_size = group_size
        self.parts: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        self.group_size = min(self.group_size, head_dim)
        if head_dim % self.group_size or self.group_size % 2:
            raise ValueError(f"KV4 cache groups of {self.group_size} channels must be even and divide the head "
                             f"dimension {head_dim}; pick a kv_group_size dividing it.")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for name, states in (("k", key_states), ("v", value_states)):
            for suffix, part in zip(("codes", "scale", "min"), quantize_kv(states, self.group_size)):
                key = f"{name}_{suffix}"
                self.parts[key] = torch.cat([self.parts[key], part], dim=-2) if key in self.parts else part
        return self.dequantized("k"), self.dequantized("v")

    def dequantized(self, name: str) -> torch.Tensor:
        """The cached ``"k"`` or ``"v"`` as floats ``[batch, kv_heads, tokens, head_dim]``."""
        return dequantize_kv(self.parts[f"{name}_codes"], self.parts[f"{name}_scale"], self.parts[f"{name}_min"],
                             self.dtype)

    def get_seq_length(self) -> int:
        return self.parts["k_codes"].shape[-2] if self.parts else 0

    def nbytes(self) -> int:
        """Bytes held by the codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same keys and values would take stored densely in ``dtype``."""
        codes = self.parts.get("k_codes")
        return 0 if codes is None else 2 * 2 * codes.numel() * torch.empty(0, dtype=dtype).element_size()

    def _map(self, fn) -> None:
        self.parts = {key: fn(tensor) for key, tensor in self.parts.items()}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"KV4Layer.crop takes a negative count of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.parts = {}
        self.is_initialized = False


class KV4Cache(Cache):
    """A 4-bit KV cache for every layer of ``config`` (the model's text config); pass it as ``generate(cache=...)``
    or let a ``W4A4KV4Config(kv_bits=4)`` model create it.

    Args:
        config: the decoder's config (``num_hidden_layers``; sliding-window layers are not supported).
        group_size: head-dimension channels per scale and minimum. Default 64: 28% of the fp16 cache's bytes.
    """

    def __init__(self, config: PreTrainedConfig, group_size: int = 64) -> None:
        config = config.get_text_config(decoder=True)
        sliding = [kind for kind in (getattr(config, "layer_types", None) or ()) if kind != "full_attention"]
        if sliding:
            raise ValueError(f"KV4Cache covers full-attention layers; this model also has {sorted(set(sliding))} "
                             "layers. Use kv_bits=16 for it.")
        super().__init__(layers=[KV4Layer(group_size) for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held by every layer's codes, scales and minima."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same keys and values would take in a dense ``dtype`` cache."""
        return sum(layer.dense_nbytes(dtype) for layer in self.layers)


def use_kv4_cache_if_configured(model) -> None:
    """Make plain ``generate`` calls of ``model`` use a :class:`KV4Cache` when its quantization config asks for 4-bit
    KV (``kv_bits=4``); a cache passed by the caller or a ``cache_implementation`` still wins."""
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "kv_bits", 16) != 4 or "_prepare_cache_for_generation" in model.__dict__:
        return
    original = model._prepare_cache_for_generation
    group_size = config.kv_group_size

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["cache"] = KV4Cache(model.config, group_size)
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare_cache
