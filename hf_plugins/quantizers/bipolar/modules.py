"""``BipolarIntLinear``: a linear layer whose weights are n-bit bipolar-INT bit planes (1..8 bits), optionally
with per-token bipolar activations (1..8 bits)."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ...kernels._dispatch import choose_backend
from ...kernels.awq_gemm import awq_gemm
from ...kernels.bitplane_gemm import (
    MAX_BITS,
    bipolar_linear_reference,
    pack_for_triton,
    planes_to_bipolar,
    unpack_planes,
)
from ...kernels.bitplane_gemm.cpu import (
    CpuBitplaneWeight,
    bitplane_linear_cpu,
    nibble_chunks,
    prepack_bitplanes,
    unprepack_bitplanes,
)
from ...kernels.bitplane_gemm.reference import group_view
from ..awq.int_quant import num_groups
from ..awq.modules import PackedMatmul
from .weights import quantize_weight_bipolar

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_reference_path(w_bits: int, in_features: int, out_features: int) -> None:
    """Once per layer shape: a slow path off the reference backend is never silent."""
    logger.warning("bipolar W%d %dx%d runs the slow reference path: the CPU int4 form needs integer zero points, an "
                   "even in_features and out_features %% 8 == 0", w_bits, in_features, out_features)


class BipolarIntLinear(nn.Module):
    """``y = x W^T + b`` for ``x [..., in_features]`` -> ``[..., out_features]``, ``W = scales * V + offsets`` per
    group of ``group_size`` inputs, ``V`` bipolar ``w_bits``-bit values stored as packed bit planes.

    Buffers: ``qweight`` (the packed planes; the name PEFT looks for) uint8 ``[w_bits, out, ceil(in/8)]``
    (plane-major, least significant first), ``scales`` and ``offsets`` float32 ``[groups, out]``, ``bias``
    ``[out]`` or None. With ``a_bits`` the activations are quantized per token to ``a_bits``-bit bipolar and the
    group products are exact integers.

    Kernels (``HF_PLUGINS_BACKEND`` or the device picks): CPU runs the nibble-plane int4 form
    (:mod:`~hf_plugins.kernels.bitplane_gemm.cpu`), holding only that form while it serves; CUDA runs AWQ's int4
    kernels for weight-only W<=4 and the bit-plane Triton kernels otherwise; ``reference`` is integer-exact.
    """

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int | None, group_size: int,
                 bias: bool, device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
            if bits is not None and not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
                raise ValueError(f"BipolarIntLinear.{name} must be an int in 1..{MAX_BITS}, got {bits!r}.")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(w_bits, out_features, -(-in_features // 8),
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, device=device))
        self.register_buffer("offsets", torch.zeros(groups, out_features, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._cpu_weight: CpuBitplaneWeight | None = None
        self._words: torch.Tensor | None = None
        self._register_state_dict_hook(_state_dict_with_planes)

    @classmethod
    def empty_for(cls, linear: nn.Linear, config, dtype: torch.dtype) -> BipolarIntLinear:
        """An empty module of ``linear``'s shape for ``config`` (a ``BipolarIntConfig``), to load a checkpoint
        into (its scales stay float32 whatever ``dtype``)."""
        return cls(linear.in_features, linear.out_features, config.w_bits, config.a_bits, config.group_size,
                   bias=linear.bias is not None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int, a_bits: int | None, group_size: int) -> BipolarIntLinear:
        """Quantize ``linear.weight [out, in]`` (after any activation-aware transform) round-to-nearest."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, w_bits, a_bits, group_size,
                     bias=linear.bias is not None, device=weight.device)
        planes, scales, offsets = quantize_weight_bipolar(weight, w_bits, group_size)
        module.qweight.copy_(planes)
        module.scales.copy_(scales)
        module.offsets.copy_(offsets)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def bipolar_values(self) -> torch.Tensor:
        """``V`` int32 ``[out, in]``, odd values in ``[-(2^w_bits - 1), 2^w_bits - 1]``."""
        return planes_to_bipolar(unpack_planes(self.planes(), self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in]``."""
        grouped = group_view(self.bipolar_values().float(), self.group_size)
        weight = grouped * self.scales.t()[..., None] + self.offsets.t()[..., None]
        return weight.flatten(1)[:, : self.in_features]

    def nibble_chunks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """The weight as AWQ int4 ``(qweight, qzeros, scales)`` summands, one per 4 bits (see
        :func:`~hf_plugins.kernels.bitplane_gemm.cpu.nibble_chunks`), or None without integer zero points."""
        if self._chunks is None and self.scales.device.type != "meta":
            self._chunks = nibble_chunks(self.planes(), self.scales, self.offsets, self.in_features)
        return self._chunks

    def awq_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(qweight, qzeros, scales)`` in AWQ's int4 "GEMM" layout holding exactly these weights, or None.

        Weight-only bipolar weights of at most 4 bits with integer zero points (any rewrite of an integer grid,
        which is what our quantizer stores) are AWQ weights: ``s' v + o = 2s' (u - z)`` with ``u = (v + L)/2``
        and ``z = (s' L - o) / (2s')``. They then run on AWQ's Triton int4 kernels.
        """
        if self.w_bits > 4:
            return None
        chunks = self.nibble_chunks()
        return None if chunks is None else chunks[0]

    def planes(self) -> torch.Tensor:
        """``qweight`` (the packed planes), regenerated bit-identically from the CPU prepacked form when that is
        what the layer holds."""
        if self._cpu_weight is not None:
            return unprepack_bitplanes(self._cpu_weight, self.w_bits)
        return self.qweight

    def _release_caches(self) -> None:
        """Restore the ``qweight`` buffer and drop every kernel form built from it."""
        if self._cpu_weight is not None:
            self.qweight = self.planes()
        self._chunks, self._cpu_weight, self._words = None, None, None

    def _apply(self, fn, recurse=True):
        self._release_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._release_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def _cpu_prepacked(self) -> CpuBitplaneWeight | None:
        # The prepacked form holds the codes exactly, so the planes are regenerated for state_dict, other devices
        # and gradients instead of staying in memory beside it.
        if self._cpu_weight is None:
            self._cpu_weight = prepack_bitplanes(self.qweight, self.scales, self.offsets, self.in_features,
                                                 self.group_size)
            if self._cpu_weight is not None:
                self.qweight = torch.empty(0, dtype=torch.uint8)
        return self._cpu_weight

    def _triton_words(self) -> torch.Tensor:
        """The planes in the Triton kernel's layout, packed once per device placement."""
        if self._words is None:
            self._words = pack_for_triton(self.planes())
        return self._words

    def _uses_packed_kernel(self, x: torch.Tensor) -> bool:
        """Packed kernels serve every layer unless the reference backend is chosen. CPU: the int4 kernels for
        layers with integer zero points (our quantizer's), others run the reference path with a warning. Triton:
        weight-only W<=4 on AWQ's tuned int4 kernels, the rest on the bit-plane kernels."""
        backend = choose_backend("bitplane_gemm", x.device)
        if backend == "reference":
            return False
        if backend == "cpu" and self._cpu_prepacked() is None:
            _warn_reference_path(self.w_bits, self.in_features, self.out_features)
            return False
        return True

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` through the packed kernel of ``x``'s device (see :meth:`forward`)."""
        if choose_backend("bitplane_gemm", x.device) == "cpu":
            return bitplane_linear_cpu(x, self._cpu_prepacked(), self.a_bits, self.bias)
        awq = self.awq_form() if self.a_bits is None else None
        if awq is not None:
            return awq_gemm(x, *awq, self.in_features if self.group_size == -1 else self.group_size, bias=self.bias,
                            backend="triton")
        from ...kernels.bitplane_gemm.triton import bipolar_linear_triton

        return bipolar_linear_triton(x, self._triton_words(), self.scales, self.offsets, self.in_features,
                                     self.group_size, self.a_bits, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._uses_packed_kernel(x)
        if packed and self.a_bits is None:
            if torch.is_grad_enabled() and x.requires_grad:
                return PackedMatmul.apply(x, self)
            return self.packed_forward(x)

        def quantized(x):
            if packed:
                return self.packed_forward(x)
            # The reference path: exact integer group products with a_bits.
            return bipolar_linear_reference(x, self.planes(), self.scales, self.offsets, self.in_features,
                                            self.group_size, self.a_bits, self.bias)

        if self.a_bits is None or not (torch.is_grad_enabled() and x.requires_grad):
            return quantized(x)
        # Straight-through estimator for the activation rounding: the value is the quantized output, the
        # gradient that of the dequantized-weight linear (adapters below this layer keep learning).
        with torch.no_grad():
            y = quantized(x)
        surrogate = nn.functional.linear(x, self.dequantized_weight().to(x.dtype))
        return y + (surrogate - surrogate.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, group_size={self.group_size}, bias={self.bias is not None}")


def _state_dict_with_planes(module: BipolarIntLinear, state_dict, prefix, local_metadata):
    """Checkpoints always hold the planes, even while the CPU prepacked form is the one in memory."""
    if module._cpu_weight is not None:
        state_dict[prefix + "qweight"] = module.planes()
    return state_dict
