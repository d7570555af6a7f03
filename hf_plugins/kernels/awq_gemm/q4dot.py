"""The native integer x int8 dot-product route for AWQ weights on CPU (``q4dot.c``, built on first use).

For few rows (decoding, speculative verification) the product is bound by reading the weights, so reading them at
4 bits and multiplying with integer dot products (``vpmaddubsw`` on AVX2, ``vpdpbusd`` with VNNI) beats both fp32
``F.linear`` and torch's int4pack kernel, which on AVX2 unpacks to bf16 and multiplies in floats. Activations are
quantized per 64-input block to int8 with an fp32 scale, and the rounding remainder again (``LEVELS`` in
``q4dot.c``: max relative error ~2e-5); the zero-point term uses the exact fp32 group sums. Measured in
``benchmarks/awq_cpu_layers.py`` (the ``q4dot`` column).

Codes of up to 4 bits are packed two per byte; 5- to 8-bit codes (AWQ W5-W8, bipolar W5-W8) one per byte (the
"wide" layout), so every weight-only width reads at most a quarter of the fp32 bytes. On AVX2 without VNNI,
8-bit codes take activations of at most 63 in magnitude (``q4dot.c``), about 4x the rounding error of the others.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .._native import load

BLOCK = 64
"""Inputs per activation block (one int8 scale each); ``in_features`` and the group size must be multiples."""

MIN_SLAB_COLUMNS = 256
"""Fewest output columns per dequantized slab of :func:`q4dot_dequant_matmul`."""

_SOURCE = Path(__file__).with_name("q4dot.c")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    library = load(_SOURCE)
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.q4dot_gemm.argtypes = (ptr, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int)
    library.q4dot_gemm.restype = ctypes.c_int
    library.q4dot_dequant.argtypes = (ptr, ptr, ptr, i64, i64, ctypes.c_int, i64, i64, ptr)
    library.q4dot_dequant.restype = None
    return library


def q4dot_available() -> bool:
    """Whether the native kernel built and loaded on this machine (see :mod:`hf_plugins.kernels._native`)."""
    return _library() is not None


def q4dot_shape_supported(in_features: int, group_size: int) -> bool:
    """Whether the kernel takes this layer: ``in_features`` and the group are multiples of :data:`BLOCK`."""
    return in_features % BLOCK == 0 and group_size % BLOCK == 0


@dataclass(frozen=True)
class Q4DotWeight:
    """AWQ weights in the kernel's layout. Build with :func:`q4dot_pack`.

    Fields:
        codes: uint8 ``[out, in // 2]`` for ``bits <= 4``; per column, byte ``j`` of 32-byte chunk ``c`` holds input
            ``64c + j`` in its low nibble and ``64c + 32 + j`` in its high nibble. uint8 ``[out, in]`` (one code
            per byte) for 5..8 bits.
        scales: fp32 ``[out, groups]``, the AWQ scale of each group, per column.
        scaled_zeros: fp32 ``[out, groups]``, ``zero * scale`` per group and column.
        group_size: inputs per group (the last group may be partial).
        bits: the code width, 1..8.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    scaled_zeros: torch.Tensor
    group_size: int
    bits: int = 4

    @property
    def wide(self) -> bool:
        """One code per byte (5..8 bits) rather than two."""
        return self.bits > 4

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * (1 if self.wide else 2)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @functools.cached_property
    def call_args(self) -> tuple[int, ...]:
        """The kernel's weight arguments ``(in, codes, scales, scaled zeros, out, group, bits)``, computed once."""
        return (self.in_features, self.codes.data_ptr(), self.scales.data_ptr(), self.scaled_zeros.data_ptr(),
                self.out_features, self.group_size, self.bits)


def q4dot_pack(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int = 4
) -> Q4DotWeight:
    """uint8 codes ``[in, out]`` (0 .. 2^bits - 1), integer zeros ``[groups, out]`` and scales ``[groups, out]``
    -> the kernel's :class:`Q4DotWeight` (0.5 bytes per weight up to 4 bits, else 1, plus 8 bytes per group and
    column)."""
    in_features, out_features = codes.shape
    if not q4dot_shape_supported(in_features, group_size):
        raise ValueError(
            f"the q4dot kernel needs in_features and group_size divisible by {BLOCK}, got {in_features} and "
            f"{group_size}; use the int4pack or dequant route for this layer."
        )
    if not 1 <= bits <= 8:
        raise ValueError(f"the q4dot kernel takes codes of 1..8 bits, got bits={bits}.")
    if bits > 4:
        packed = codes.t().to(torch.uint8).contiguous()
    else:
        chunks = codes.t().reshape(out_features, in_features // BLOCK, 2, BLOCK // 2)
        packed = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out_features, in_features // 2).contiguous()
    scales32 = scales.float()
    return Q4DotWeight(packed, scales32.t().contiguous(), (zeros.float() * scales32).t().contiguous(), group_size,
                       bits)


def q4dot_matmul(x2d: torch.Tensor, weight: Q4DotWeight) -> torch.Tensor:
    """fp32 ``[M, in] -> [M, out]`` through the native kernel (on torch's intra-op thread count)."""
    x32 = x2d.float().contiguous()
    rows = x32.shape[0]
    y = x32.new_empty((rows, weight.out_features))
    status = _library().q4dot_gemm(x32.data_ptr(), rows, *weight.call_args, y.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError(f"q4dot could not allocate its scratch for {rows} rows of {weight.in_features} inputs")
    return y


def q4dot_codes(weight: Q4DotWeight) -> torch.Tensor:
    """uint8 codes ``[in, out]``: the inverse of :func:`q4dot_pack`'s packing."""
    if weight.wide:
        return weight.codes.t()
    chunks = weight.codes.view(weight.out_features, weight.in_features // BLOCK, 1, BLOCK // 2)
    return torch.cat((chunks & 0xF, chunks >> 4), dim=2).view(weight.out_features, weight.in_features).t()


def q4dot_dequant_matmul(x2d: torch.Tensor, weight: Q4DotWeight, slab_floats: int) -> torch.Tensor:
    """fp32 ``[M, in] -> [M, out]`` with exact fp32 math: dequantize about ``slab_floats`` weights at a time (a
    cache-sized transient, never the whole float weight; one pass in C) and multiply them with ``F.linear`` (MKL
    sgemm)."""
    library = _library()
    in_features, out_features = weight.in_features, weight.out_features
    _, codes, scales, scaled_zeros, _, group, bits = weight.call_args
    x32 = x2d.float().contiguous()
    # At least MIN_SLAB_COLUMNS: narrower slabs starve sgemm (8960 -> 1536 at 64 rows: 0.81x fp32 with 117 columns).
    columns = min(out_features, max(MIN_SLAB_COLUMNS, slab_floats // in_features))
    slab = torch.empty(columns, in_features)
    y = x32.new_empty(x32.shape[0], out_features)
    for start in range(0, out_features, columns):
        stop = min(start + columns, out_features)
        library.q4dot_dequant(codes, scales, scaled_zeros, in_features, group, bits, start, stop, slab.data_ptr())
        y[:, start:stop] = torch.nn.functional.linear(x32, slab[: stop - start])
    return y
