"""Bipolar-INT weights from the integer quantizers we already have (lossless re-parameterisation).

An unsigned group quantizer ``w = s (u - z)`` (our RTN, or AWQ's after its scale and clip searches) is the same
set of numbers as ``w = (s/2) v + s ((2^n - 1)/2 - z)`` with ``v = 2u - (2^n - 1)`` bipolar, so the bipolar
weights inherit every search of the integer quantizer and lose nothing in the conversion.
"""

from __future__ import annotations

import torch

from ...kernels.bitplane_gemm import affine_to_bipolar, pack_code_planes
from ..awq.int_quant import quantize_groupwise


def quantize_weight_bipolar(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> ``(packed planes [bits, out, ceil(in/8)] uint8, scales [groups, out],
    offsets [groups, out])`` float32, with ``w ~ scales * v + offsets`` per group."""
    # AWQ's own grid (fp16-exact scales, as its checkpoints store them), so searches and results carry over.
    codes, scales, zeros = quantize_groupwise(weight, bits, group_size)
    bipolar_scales, offsets = affine_to_bipolar(scales, zeros, bits)
    return pack_code_planes(codes, bits), bipolar_scales.t().contiguous(), offsets.t().contiguous()
