"""A 4-bit KV cache: keys and values stored as packed 4-bit codes; croppable and row-selectable, so speculative
decoding and batches work on it.

- **Values**: asymmetric per token, head and group of ``value_group_size`` head-dimension channels (fp16 scale
  and minimum per group).
- **Keys**, chosen per layer from the first (prefill) keys it sees:
  - ``token``: like the values, in groups of ``group_size`` (keys need the finer groups); or
  - ``pair``: symmetric per channel with a scale frozen at prefill, shared by the two channels RoPE rotates
    together (the largest magnitude of the pair ``sqrt(k_i^2 + k_(i+d/2)^2)`` over the prefill tokens, which
    rotation leaves unchanged), for layers where some head has an outlier pair (``OUTLIER_PAIR_RATIO``).
    Keys with large per-channel offsets (Qwen2's key bias) need this: a per-token scale would spend the 16
    levels on the offset channels.

Every token's codes depend only on the token and the prefill, and every query (its own token's included) reads
the dequantized keys and values: prefill, decoding and speculative verification see the same numbers, and
``crop`` is a slice.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from ..attention.cache_layers import BatchMappedLayer
from ..attention.kv4 import KV4_ATTENTION
from ..kernels.kv4_attention import PackedKV, dequantize_packed
from ..kernels.w4ax_gemm.reference import pack_int4

CODE_MAX = 15
PAIR_MAX = 7
KEY_SCHEMES = ("token", "pair")
OUTLIER_PAIR_RATIO = 8.0
"""A layer's keys are quantized ``pair``-wise when some head has a RoPE pair this many times larger than its
median pair at prefill (Qwen2.5-0.5B: up to 40 in 6 of 24 layers; SmolLM2-135M: at most 5)."""


def quantize_kv(states: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[batch, heads, tokens, head_dim]`` -> ``(uint8 codes [.., head_dim / 2], fp16 scales and minima
    [.., head_dim / group_size])``: asymmetric round-to-nearest per group; ``x ~ code * scale + minimum``
    (:class:`~hf_plugins.kernels.kv4_attention.PackedKV`'s asymmetric layout)."""
    *lead, head_dim = states.shape
    grouped = states.float().reshape(*lead, head_dim // group_size, group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    # The stored (fp16) scale and minimum are the ones the codes are computed against: dequantizing is exact to them.
    minimum = low.half()
    scale = ((high - minimum.float()) / CODE_MAX).clamp_min(torch.finfo(torch.float16).tiny).half()
    codes = torch.round((grouped - minimum.float()[..., None]) / scale.float()[..., None]).clamp(0, CODE_MAX)
    # Stored as W4Ax's offset-binary nibbles: unsigned code u is the signed code u - 8.
    return pack_int4(codes.reshape(*lead, head_dim) - 8), scale, minimum


def pair_scales(keys: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric scales ``[batch, heads, 1, head_dim]`` (fp16) from prefill ``keys``: the largest
    magnitude of each RoPE pair (channels ``i`` and ``i + head_dim / 2``) over the tokens, over 7."""
    half = keys.shape[-1] // 2
    squared = keys.float().pow(2)
    magnitude = (squared[..., :half] + squared[..., half:]).sqrt().amax(-2, keepdim=True)
    scale = (magnitude / PAIR_MAX).clamp_min(torch.finfo(torch.float16).tiny).half()
    return torch.cat([scale, scale], dim=-1)


def quantize_pairwise(keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Keys -> packed nibbles of ``clamp(round(k / scale), -7, 7)``."""
    return pack_int4(torch.round(keys.float() / scale.float()).clamp(-PAIR_MAX, PAIR_MAX))


def outlier_pair_ratio(scale: torch.Tensor) -> float:
    """The largest ratio, over rows and heads, of a head's largest RoPE-pair scale to its median one."""
    half = scale[..., : scale.shape[-1] // 2].float()
    return float((half.amax(-1) / half.median(-1).values.clamp_min(1e-30)).max())


class KV4Layer(BatchMappedLayer, DynamicLayer):
    """One attention layer's 4-bit cache. ``update`` appends the new tokens' codes and returns the whole K and V
    ``[batch, kv_heads, tokens, head_dim]``: dequantized in the model's dtype, or, with ``packed_outputs``, as
    :class:`~hf_plugins.kernels.kv4_attention.PackedKV` for an attention function that reads them directly
    (:data:`hf_plugins.attention.KV4_ATTENTION`).

    Args:
        group_size: head-dimension channels per scale and minimum of per-token keys (clipped to the head
            dimension, which it must divide).
        value_group_size: the same for values.
        key_scheme: ``"token"``, ``"pair"`` or None (chosen at the first update, module docstring).
        packed_outputs: return ``PackedKV`` from ``update`` instead of dense tensors.
    """

    is_croppable = True

    def __init__(self, group_size: int = 32, value_group_size: int = 64, key_scheme: str | None = None,
                 packed_outputs: bool = False) -> None:
        super().__init__()
        if key_scheme not in (None, *KEY_SCHEMES):
            raise ValueError(f"key_scheme must be None (chosen at prefill) or one of {KEY_SCHEMES}, got "
                             f"{key_scheme!r}.")
        self.group_size = group_size
        self.value_group_size = value_group_size
        self.key_scheme = key_scheme
        self.packed_outputs = packed_outputs
        self.parts: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        self.group_size = min(self.group_size, head_dim)
        self.value_group_size = min(self.value_group_size, head_dim)
        for group in (self.group_size, self.value_group_size):
            if head_dim % group or group % 2:
                raise ValueError(f"KV4 cache groups of {group} channels must be even and divide the head dimension "
                                 f"{head_dim}; pick group sizes dividing it.")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.parts["k_pair_scale"] = pair_scales(key_states)
        if self.key_scheme is None:
            self.key_scheme = "pair" if outlier_pair_ratio(self.parts["k_pair_scale"]) > OUTLIER_PAIR_RATIO else "token"
        if self.key_scheme == "token":
            del self.parts["k_pair_scale"]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # An inference cache: the stored codes carry no autograd history.
        key_states, value_states = key_states.detach(), value_states.detach()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.key_scheme == "pair":
            self._append("k_codes", quantize_pairwise(key_states, self.parts["k_pair_scale"]))
        else:
            self._append_groups("k", key_states, self.group_size)
        self._append_groups("v", value_states, self.value_group_size)
        if self.packed_outputs:
            return self.packed("k"), self.packed("v")
        return self.dequantized("k"), self.dequantized("v")

    def _append(self, key: str, part: torch.Tensor) -> None:
        self.parts[key] = torch.cat([self.parts[key], part], dim=-2) if key in self.parts else part

    def _append_groups(self, name: str, states: torch.Tensor, group_size: int) -> None:
        for suffix, part in zip(("codes", "scale", "min"), quantize_kv(states, group_size)):
            self._append(f"{name}_{suffix}", part)

    def packed(self, name: str) -> PackedKV:
        """The cached ``"k"`` or ``"v"`` as codes and scales, without copying."""
        if name == "k" and self.key_scheme == "pair":
            return PackedKV(self.parts["k_codes"], self.parts["k_pair_scale"], None, 1, self.dtype)
        group_size = self.group_size if name == "k" else self.value_group_size
        return PackedKV(self.parts[f"{name}_codes"], self.parts[f"{name}_scale"], self.parts[f"{name}_min"],
                        group_size, self.dtype)

    def dequantized(self, name: str) -> torch.Tensor:
        """The cached ``"k"`` or ``"v"`` as floats ``[batch, kv_heads, tokens, head_dim]``."""
        return dequantize_packed(self.packed(name))

    def get_seq_length(self) -> int:
        return self.parts["k_codes"].shape[-2] if "k_codes" in self.parts else 0

    def nbytes(self) -> int:
        """Bytes held by the codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same keys and values would take stored densely in ``dtype``."""
        codes = self.parts.get("k_codes")
        return 0 if codes is None else 2 * 2 * codes.numel() * torch.empty(0, dtype=dtype).element_size()

    def _map(self, fn, per_token: bool = True) -> None:
        """Apply ``fn`` to every stored tensor (``per_token=False``: only those with a token axis)."""
        self.parts = {key: fn(t) if per_token or key != "k_pair_scale" else t for key, t in self.parts.items()}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"KV4Layer.crop takes a negative count of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove, :], per_token=False)

    def reset(self) -> None:
        self.parts = {}
        self.is_initialized = False


class KV4Cache(Cache):
    """A 4-bit KV cache for every layer of ``config`` (the model's text config); pass it as ``generate(cache=...)``
    or let a ``W4A4KV4Config(kv_bits=4)`` model create it.

    Args:
        config: the decoder's config (``num_hidden_layers``; sliding-window layers are not supported).
        group_size: head-dimension channels per scale and minimum of per-token keys. Default: 32.
        value_group_size: the same for values. Default: 64 (with 32 for keys: 29.7% of an fp16 cache's bytes).
        key_scheme: ``"token"``, ``"pair"`` or None: each layer picks at prefill (module docstring).
        packed_outputs: layers hand ``PackedKV`` to the attention instead of dense tensors; only for a model whose
            attention implementation is :data:`hf_plugins.attention.KV4_ATTENTION` (a ``W4A4KV4Config(kv_bits=4)``
            model gets it, and ``generate`` then turns this on).
    """

    def __init__(self, config: PreTrainedConfig, group_size: int = 32, value_group_size: int = 64,
                 key_scheme: str | None = None, packed_outputs: bool = False) -> None:
        config = config.get_text_config(decoder=True)
        sliding = [kind for kind in (getattr(config, "layer_types", None) or ()) if kind != "full_attention"]
        if sliding:
            raise ValueError(f"KV4Cache covers full-attention layers; this model also has {sorted(set(sliding))} "
                             "layers. Use kv_bits=16 for it.")
        super().__init__(layers=[KV4Layer(group_size, value_group_size, key_scheme, packed_outputs)
                                 for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held by every layer's codes, scales and minima."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the same keys and values would take in a dense ``dtype`` cache."""
        return sum(layer.dense_nbytes(dtype) for layer in self.layers)


def use_kv4_cache_if_configured(model) -> None:
    """Make plain ``generate`` calls of ``model`` use a :class:`KV4Cache` when its quantization config asks for 4-bit
    KV (``kv_bits=4``); a cache passed by the caller or a ``cache_implementation`` still wins. A model on the
    default (SDPA) attention switches to :data:`~hf_plugins.attention.KV4_ATTENTION`, and its caches hand the
    packed codes to it; another attention the user chose is kept, with dense caches."""
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "kv_bits", 16) != 4 or "_prepare_cache_for_generation" in model.__dict__:
        return
    if model.config._attn_implementation in (None, "sdpa"):
        model.set_attn_implementation(KV4_ATTENTION)
    original = model._prepare_cache_for_generation
    groups = (config.kv_group_size, config.kv_value_group_size)

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            packed = model.config._attn_implementation == KV4_ATTENTION
            model_kwargs["cache"] = KV4Cache(model.config, *groups, packed_outputs=packed)
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare_cache
