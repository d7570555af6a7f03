"""CPU path of the bipolar linear: any 1..8-bit weights as nibble planes on the packed int4 CPU kernels.

The unsigned code ``u = (v + 2^n - 1) / 2`` of an n-bit bipolar weight splits into 4-bit chunks
``u = sum_c 16^c u_c``. With our quantizer's integer zero point ``z`` (``w = s' v + o = 2 s' (u - z)``, split the
same way, ``z = sum_c 16^c z_c``), the weight is a sum of AWQ int4 weights::

    w = sum_c (2 s' 16^c) (u_c - z_c)

so ``x W^T`` is a packed int4 matmul per chunk (one for n <= 4, two for 5..8 bits) with the exact-scale handling
of :mod:`hf_plugins.kernels.awq_gemm.cpu`. The chunks are stacked along the outputs into one int4 weight
``[chunks * out, in]``: one kernel call, whose output halves are summed (1.4x faster than two calls at 576 x 576,
M = 1). This is the bit-level decomposition of the GPU kernel at the granularity this CPU computes fastest
(``benchmarks/bitplane_cpu.py``). Where the native q4dot kernel takes the layer, 5..8-bit weights instead keep
their whole codes, one per byte, in a single chunk (``awq_gemm.prepack_codes``): the same bytes, half the integer
work and no output sum (whole-model figures per width: ``benchmarks/awq_cpu_speed.py``, ``docs/awq-cpu.md``).
The other routes measured on this project's CPUs lose: ``torch._int_mm``
(int8 x int8 -> int32) runs 3-16x slower than fp32 sgemm without VNNI, and an inductor-compiled dequant + GEMV
7.7x slower than the int4 kernel at 1536 x 8960, M = 1 (``awq_gemm/cpu.py``).

Activations of ``a_bits`` are quantized per token to bipolar integers ``|v| <= 255``, which bf16 holds exactly,
so the int4 kernel's bf16 activation rounding adds nothing to the quantization itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..awq_gemm import CpuAwqWeight, awq_gemm_cpu, pack_awq, prepack, prepack_codes, unprepack_codes
from .reference import (
    bipolar_limit,
    pack_code_planes,
    quantize_activations,
    unpack_code_planes,
)

NIBBLE = 4
"""Bits per chunk: the int4 kernels' code width."""


def integer_zeros(scales: torch.Tensor, offsets: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The zero points ``z = (s' L - o) / (2 s')`` of ``w = s' v + o`` as int32 ``[groups, out]``, or None when
    some ``z`` is not an integer in ``[0, 2^bits)`` or some ``2 s'`` is not fp16-exact (the int4 kernels' scales).

    Our quantizer's weights always qualify (they are a rewrite of an integer grid with fp16 scales).
    """
    limit = bipolar_limit(bits)
    scales = 2 * scales.float()
    zeros = (scales / 2 * limit - offsets.float()) / scales.clamp_min(1e-30)
    rounded = zeros.round()
    exact = bool((scales.half().float() == scales).all()) and torch.allclose(zeros, rounded, atol=1e-3)
    if not exact or rounded.min() < 0 or rounded.max() > limit:
        return None
    return rounded.to(torch.int32)


def nibble_chunks(
    planes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The weight ``scales * V + offsets`` as AWQ int4 weights whose sum it is exactly, least significant first.

    Args:
        planes: packed +-1 planes uint8 ``[bits, out, ceil(in/8)]``.
        scales, offsets: float32 ``[groups, out]``.
        in_features: ``in``.

    Returns one ``(qweight [in, out/8], qzeros [groups, out/8], scales fp16 [groups, out])`` per 4 bits of
    ``bits``, or None when the weight has no integer zero points (:func:`integer_zeros`) or ``out % 8``.
    """
    bits, out_features = planes.shape[0], planes.shape[1]
    zeros = integer_zeros(scales, offsets, bits)
    if zeros is None or out_features % 8:
        return None
    codes = unpack_code_planes(planes, in_features)  # [out, in]
    chunks = []
    for shift in range(0, bits, NIBBLE):
        chunk_codes = (codes >> shift) & 0xF
        chunk_zeros = (zeros >> shift) & 0xF
        chunk_scales = (2 * scales.float() * (1 << shift)).half()
        chunks.append((pack_awq(chunk_codes.t().contiguous()), pack_awq(chunk_zeros), chunk_scales))
    return chunks


@dataclass(frozen=True)
class CpuBitplaneWeight:
    """A bipolar weight prepacked for :func:`bitplane_linear_cpu`: its nibble chunks stacked along the outputs,
    ``[chunks * out, in]``, as one :class:`CpuAwqWeight`."""

    stacked: CpuAwqWeight
    chunks: int

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held."""
        return self.stacked.tensors()

    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self.stacked.nbytes()


def prepack_bitplanes(
    planes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int, group_size: int
) -> CpuBitplaneWeight | None:
    """Prepack once at load time (see :func:`nibble_chunks` and the module doc); None when the weight has no
    integer zero points (or an odd ``in_features``, which the int4 CPU layout cannot hold)."""
    bits = planes.shape[0]
    group = in_features if group_size == -1 else group_size
    if bits > NIBBLE:
        zeros = integer_zeros(scales, offsets, bits)
        if zeros is None:
            return None
        codes = unpack_code_planes(planes, in_features)  # [out, in]
        wide = prepack_codes(codes.t(), zeros, 2 * scales.float(), group, bits)
        if wide is not None:
            return CpuBitplaneWeight(wide, 1)
    chunks = nibble_chunks(planes, scales, offsets, in_features)
    if chunks is None or in_features % 2:
        return None
    stacked = (torch.cat(parts, dim=1) for parts in zip(*chunks))  # AWQ tensors are [.., out]: out is dim 1
    return CpuBitplaneWeight(prepack(*stacked, group), len(chunks))


def unprepack_bitplanes(weight: CpuBitplaneWeight, bits: int) -> torch.Tensor:
    """Exact inverse of :func:`prepack_bitplanes` for the planes: uint8 ``[bits, out, ceil(in/8)]``, bit-identical
    to the planes packed (so modules can drop them while the prepacked form serves)."""
    codes = unprepack_codes(weight.stacked).to(torch.int32)  # [in, chunks * out]
    chunks = codes.unflatten(1, (weight.chunks, -1))
    combined = sum(chunks[:, c] << (NIBBLE * c) for c in range(weight.chunks))  # [in, out]
    return pack_code_planes(combined.t(), bits)


def bitplane_linear_cpu(
    x: torch.Tensor, weight: CpuBitplaneWeight, act_bits: int | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` in x's dtype: ``x W^T + bias``, with ``x`` first quantized per token to
    ``act_bits``-bit bipolar values when given (as :func:`~.reference.bipolar_linear_reference` does)."""
    if act_bits is None:
        inputs, token_scale = x, None
    else:
        values, token_scale = quantize_activations(x, act_bits)
        inputs = values.float()
    y = awq_gemm_cpu(inputs, weight.stacked)
    if weight.chunks > 1:
        y = y.unflatten(-1, (weight.chunks, -1)).sum(-2)
    if token_scale is not None:
        y = y * token_scale
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
