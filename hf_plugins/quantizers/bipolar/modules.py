"""``BipolarIntLinear``: a linear layer whose weights are n-bit bipolar-INT bit planes (1..8 bits), optionally
with per-token bipolar activations (1..8 bits)."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.bitplane_gemm import MAX_BITS, bipolar_linear_reference, planes_to_bipolar, unpack_planes
from ...kernels.bitplane_gemm.reference import group_view
from ..awq.int_quant import num_groups
from .weights import quantize_weight_bipolar


class BipolarIntLinear(nn.Module):
    """``y = x W^T + b`` for ``x [..., in_features]`` -> ``[..., out_features]``, ``W = scales * V + offsets`` per
    group of ``group_size`` inputs, ``V`` bipolar ``w_bits``-bit values stored as packed bit planes.

    Buffers: ``qweight`` (the packed planes; the name PEFT looks for) uint8 ``[w_bits, out, ceil(in/8)]``
    (plane-major, least significant first), ``scales`` and ``offsets`` float32 ``[groups, out]``, ``bias``
    ``[out]`` or None. With ``a_bits`` the activations are quantized per token to ``a_bits``-bit bipolar and the
    group products are exact integers.
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
        return planes_to_bipolar(unpack_planes(self.qweight, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in]``."""
        grouped = group_view(self.bipolar_values().float(), self.group_size)
        weight = grouped * self.scales.t()[..., None] + self.offsets.t()[..., None]
        return weight.flatten(1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference path (exact integers with a_bits); the packed CPU and Triton kernels are not built yet.
        def quantized(x):
            return bipolar_linear_reference(x, self.qweight, self.scales, self.offsets, self.in_features,
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
