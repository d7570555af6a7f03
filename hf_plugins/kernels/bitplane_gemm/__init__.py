"""Bit-plane matmuls of bipolar-INT operands (1-8 bit weights and activations), with backend dispatch.

Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`bipolar_linear_reference`, integer-exact pure torch, the test oracle.
- ``cpu``: :func:`~.cpu.bitplane_linear_cpu` on a :class:`~.cpu.CpuBitplaneWeight` (nibble planes on the int4
  CPU kernels). Modules prepack once with :func:`~.cpu.prepack_bitplanes`; :func:`bipolar_linear` prepacks per call.
- ``triton``: :func:`~.triton.bipolar_linear_triton` on :func:`pack_for_triton` words, imported on first use.
"""

import torch

from .._dispatch import choose_backend
from .reference import (
    MAX_BITS,
    affine_to_bipolar,
    bipolar_limit,
    bipolar_linear_reference,
    bipolar_to_codes,
    bit_planes,
    pack_code_planes,
    bitplane_matmul_reference,
    codes_to_bipolar,
    pack_for_triton,
    pack_planes,
    planes_to_bipolar,
    round_to_bipolar,
    signed_to_bipolar,
    unpack_planes,
)

__all__ = [
    "MAX_BITS",
    "affine_to_bipolar",
    "bipolar_limit",
    "bipolar_to_codes",
    "bit_planes",
    "bipolar_linear_reference",
    "bipolar_linear",
    "bitplane_matmul_reference",
    "codes_to_bipolar",
    "pack_code_planes",
    "pack_for_triton",
    "pack_planes",
    "planes_to_bipolar",
    "round_to_bipolar",
    "signed_to_bipolar",
    "unpack_planes",
]


def bipolar_linear(
    x: torch.Tensor,
    weight_planes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_features: int,
    group_size: int,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x W^T + bias`` for ``x [..., in_features]`` -> ``[..., out]``, ``W = scales * V + offsets`` per group
    of ``V``'s bipolar values stored as packed planes ``[w_bits, out, ceil(in/8)]`` (see
    :func:`bipolar_linear_reference` for every argument); ``backend`` as in :func:`~.._dispatch.choose_backend`.

    The cpu backend needs integer zero points (our quantizer's weights) and raises ``ValueError`` otherwise.
    """
    chosen = choose_backend("bipolar_linear", x.device, backend)
    if chosen == "reference":
        return bipolar_linear_reference(x, weight_planes, scales, offsets, in_features, group_size, act_bits, bias)
    if chosen == "cpu":
        from .cpu import bitplane_linear_cpu, prepack_bitplanes

        weight = prepack_bitplanes(weight_planes, scales, offsets, in_features, group_size)
        if weight is None:
            raise ValueError("the cpu backend runs weights whose offsets are integer zero points with fp16 scales "
                             "(as the quantizer writes them) and out_features % 8 == 0; use backend='reference'.")
        return bitplane_linear_cpu(x, weight, act_bits, bias)
    from .triton import bipolar_linear_triton

    return bipolar_linear_triton(x, pack_for_triton(weight_planes), scales, offsets, in_features, group_size,
                                 act_bits, bias)
