"""Bit-plane matmuls of bipolar-INT operands (1-8 bit weights and activations)."""

from .reference import (
    MAX_BITS,
    affine_to_bipolar,
    bipolar_limit,
    bipolar_to_codes,
    bit_planes,
    bipolar_linear_reference,
    bitplane_matmul_reference,
    codes_to_bipolar,
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
    "bitplane_matmul_reference",
    "codes_to_bipolar",
    "pack_planes",
    "planes_to_bipolar",
    "round_to_bipolar",
    "signed_to_bipolar",
    "unpack_planes",
]
