"""Triton W4Ax: 4-bit weights times mixed 4-/8-bit activations on INT8 tensor cores (Hopper has no INT4 MMA).

Layout (see :mod:`.reference`; everything in the permuted channel order):

- weights: offset-binary nibbles ``uint8 [ceil(K/2), N]``, byte ``j`` holding channels ``2j`` (low) and ``2j + 1``
  (high), and fp32 scales ``[groups, N]``;
- activations (made by :func:`quantize_activations_triton`, one fused pass that gathers the permuted channels,
  takes each token's block absmax, rounds and packs): int8 ``[M, a8_channels]`` for the outlier blocks, nibbles
  ``uint8 [M, ceil((K - a8_channels) / 2)]`` for the rest, fp32 scales ``[M, blocks]``.

The GEMM never interleaves nibbles: a step of ``STEP`` channels is two int8 dots, even channels times the low
weight nibbles and odd channels times the high ones, so 4-bit activation bytes unpack the same way as the weight
bytes (mask, shift, subtract 8) and 8-bit activations are read at stride 2. Each step's int32 partial is scaled by
its token-block and channel-group scales in registers. Every output tile does the same mix of 8- and 4-bit steps,
so a persistent grid of one program per SM walking the tiles in grouped order keeps the SMs evenly loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .._tiles import grouped_tile_of
from .reference import A4_MAX, A8_MAX, BLOCK, check_layout, num_blocks, step_size

__all__ = ["quantize_activations_triton", "w4ax_linear_triton", "w4ax_matmul_triton"]

_INTERPRETER = triton_interpreter()
_INTERPRETER_PROGRAMS = 4  # the persistent grid under the interpreter: enough to walk several tiles each


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _nibbles(b_bytes):
    """Offset-binary bytes -> (low, high) signed int8 codes."""
    b_bytes = b_bytes.to(tl.int32)
    return ((b_bytes & 15) - 8).to(tl.int8), ((b_bytes >> 4) - 8).to(tl.int8)


@triton.jit
def _rounded(b_x, b_scale, LIMIT):
    """``clamp(round_half_away(x / scale), -LIMIT, LIMIT)`` as int32; ``div_rn`` because fp32 ``/`` is approximate
    on NVIDIA and one ulp moves values across rounding ties."""
    b_r = tl.div_rn(b_x, b_scale)
    b_mag = tl.minimum(tl.floor(tl.abs(b_r) + 0.5), LIMIT)
    return tl.where(b_r < 0, -b_mag, b_mag).to(tl.int32)


@triton.jit
def quantize_activations_kernel(x, perm, x8, x4, scales, M, K, A8, K4H, NB, HALF: tl.constexpr,
                                A8_LIMIT: tl.constexpr, A4_LIMIT: tl.constexpr):
    """Block ``program_id(1)`` of token ``program_id(0)``: gather ``x[m, perm[c]]``, scale by the block absmax,
    round, and store int8 codes (8-bit blocks, ``x8 [M, A8]``) or packed nibbles (``x4 [M, K4H]``); the scale goes
    to ``scales [M, NB]``. ``HALF = BLOCK // 2``: each program handles the block's even and odd channels apart."""
    i_m = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1)
    o_even = i_b * (2 * HALF) + 2 * tl.arange(0, HALF)
    m_even, m_odd = o_even < K, (o_even + 1) < K
    c_even = tl.load(perm + o_even, mask=m_even, other=0)
    c_odd = tl.load(perm + o_even + 1, mask=m_odd, other=0)
    b_even = tl.load(x + i_m * K + c_even, mask=m_even, other=0.).to(tl.float32)
    b_odd = tl.load(x + i_m * K + c_odd, mask=m_odd, other=0.).to(tl.float32)
    limit = tl.where(i_b * (2 * HALF) < A8, A8_LIMIT * 1.0, A4_LIMIT * 1.0)
    in_a8 = o_even < A8  # per lane, though a block is all 8-bit or all 4-bit (A8 is a multiple of the block)
    b_zero = tl.zeros([HALF], dtype=tl.float32)
    b_max = tl.maximum(tl.max(tl.maximum(tl.abs(b_even), tl.abs(b_odd)), axis=0), 1.1754943508222875e-38)
    b_scale = tl.div_rn(b_zero + b_max, b_zero + limit)  # blocks: every lane holds the same scale
    tl.store(scales + i_m * NB + i_b, tl.max(b_scale, axis=0))
    q_even = _rounded(b_even, b_scale, limit)
    q_odd = _rounded(b_odd, b_scale, limit)
    tl.store(x8 + i_m * A8 + o_even, q_even.to(tl.int8), mask=m_even & in_a8)
    tl.store(x8 + i_m * A8 + o_even + 1, q_odd.to(tl.int8), mask=m_odd & in_a8)
    packed = ((q_even + 8) | ((q_odd + 8) << 4)).to(tl.uint8)
    o_byte = (o_even - A8) // 2
    tl.store(x4 + i_m * K4H + o_byte, packed, mask=m_even & ~in_a8)


@triton.jit
def _scaled_step(b_int, sa, sw, o_m, o_n, m_m, m_n, k0, NB, N, GROUP_K, ABLOCK: tl.constexpr):
    """A step's int32 partial times its token-block scales ``sa [M, NB]`` and channel-group scales ``sw [G, N]``."""
    b_sa = tl.load(sa + o_m * NB + k0 // ABLOCK, mask=m_m, other=0.)
    b_sw = tl.load(sw + (k0 // GROUP_K) * N + o_n, mask=m_n, other=0.)
    return b_int.to(tl.float32) * b_sa[:, None] * b_sw[None, :]


@triton.jit
def w4ax_gemm_kernel(
    x8, x4, sa, w, sw, bias, y, M, N, K, A8, K4H, KH, NB, GROUP_K,
    HAS_BIAS: tl.constexpr, STEP: tl.constexpr, ABLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y [M, N] = sum_steps sa * sw * (int8 dots) (+ bias)``. Persistent grid: program ``p`` computes tiles
    ``p, p + programs, ...`` of the grouped tile order."""
    HALF: tl.constexpr = STEP // 2
    o_j = tl.arange(0, HALF).to(tl.int64)
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        i_m, i_n = grouped_tile_of(tile, M, N, BM, BN, GROUP_M)
        o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
        o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
        m_m, m_n = o_m < M, o_n < N
        b_acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, A8, STEP):  # outlier blocks: int8 activations read at stride 2
            o_k = k0 + 2 * o_j
            b_xe = tl.load(x8 + o_m[:, None] * A8 + o_k[None, :], mask=m_m[:, None] & (o_k < A8)[None, :], other=0)
            b_xo = tl.load(x8 + o_m[:, None] * A8 + o_k[None, :] + 1,
                           mask=m_m[:, None] & ((o_k + 1) < A8)[None, :], other=0)
            o_w = k0 // 2 + o_j
            b_w = tl.load(w + o_w[:, None] * N + o_n[None, :], mask=(o_w < KH)[:, None] & m_n[None, :], other=136)
            b_wl, b_wh = _nibbles(b_w)
            b_int = tl.dot(b_xe, b_wl, out_dtype=tl.int32) + tl.dot(b_xo, b_wh, out_dtype=tl.int32)
            b_acc += _scaled_step(b_int, sa, sw, o_m, o_n, m_m, m_n, k0, NB, N, GROUP_K, ABLOCK)
        for k0 in range(A8, K, STEP):  # 4-bit blocks: activation bytes unpack like the weight bytes
            o_x = (k0 - A8) // 2 + o_j
            b_x = tl.load(x4 + o_m[:, None] * K4H + o_x[None, :], mask=m_m[:, None] & (o_x < K4H)[None, :],
                          other=136)
            b_xl, b_xh = _nibbles(b_x)
            o_w = k0 // 2 + o_j
            b_w = tl.load(w + o_w[:, None] * N + o_n[None, :], mask=(o_w < KH)[:, None] & m_n[None, :], other=136)
            b_wl, b_wh = _nibbles(b_w)
            b_int = tl.dot(b_xl, b_wl, out_dtype=tl.int32) + tl.dot(b_xh, b_wh, out_dtype=tl.int32)
            b_acc += _scaled_step(b_int, sa, sw, o_m, o_n, m_m, m_n, k0, NB, N, GROUP_K, ABLOCK)
        if HAS_BIAS:
            b_acc += tl.load(bias + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        tl.store(y + o_m[:, None] * N + o_n[None, :], b_acc.to(y.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])


def quantize_activations_triton(
    x2d: torch.Tensor, perm: torch.Tensor, a8_channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x2d [M, K]`` (original channel order) -> ``(int8 [M, a8_channels], uint8 nibbles
    [M, ceil((K - a8_channels) / 2)], fp32 scales [M, blocks])`` in one pass (gather, block absmax, round, pack)."""
    M, K = x2d.shape
    blocks = num_blocks(K)
    x8 = _new_output((M, a8_channels), torch.int8, x2d.device)
    x4 = _new_output((M, -(-(K - a8_channels) // 2)), torch.uint8, x2d.device)
    scales = _new_output((M, blocks), torch.float32, x2d.device)
    quantize_activations_kernel[(M, blocks)](x2d.contiguous(), perm, x8, x4, scales, M, K, a8_channels, x4.shape[1],
                                             blocks, HALF=BLOCK // 2, A8_LIMIT=A8_MAX, A4_LIMIT=A4_MAX)
    return x8, x4, scales


def _tiling(M: int, N: int) -> dict[str, int]:
    """Tile sizes: 16 rows for decode (the weight stream dominates); big blocks under the interpreter, whose cost
    is per program step."""
    if _INTERPRETER:
        return {"BM": min(64, max(16, triton.next_power_of_2(M))), "BN": min(64, max(16, triton.next_power_of_2(N)))}
    block_m = 16 if M <= 16 else 64 if M <= 128 else 128
    return {"BM": block_m, "BN": 64 if M <= 128 else 128, "num_warps": 4 if block_m <= 64 else 8, "num_stages": 3}


def w4ax_matmul_triton(x8: torch.Tensor, x4: torch.Tensor, x_scales: torch.Tensor, w_packed: torch.Tensor,
                       w_scales: torch.Tensor, in_features: int, group_size: int,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The W4Ax product of quantized activations (:func:`quantize_activations_triton`) and packed weights.

    Args:
        x8, x4, x_scales: the activation parts, ``[M, a8]`` int8, ``[M, ceil((K - a8) / 2)]`` uint8, ``[M, blocks]``.
        w_packed: ``uint8 [ceil(K/2), N]`` (:func:`~.reference.pack_int4` of the codes ``[N, K]``, transposed).
        w_scales: fp32 ``[groups, N]``.
        in_features: ``K``; group_size: 64, 128 or -1.

    Returns ``[M, N]`` in ``out_dtype``.
    """
    a8 = x8.shape[1]
    check_layout(in_features, a8, group_size)
    M, N = x8.shape[0], w_packed.shape[1]
    y = _new_output((M, N), out_dtype, x8.device)
    tiling = _tiling(M, N)
    tiles = triton.cdiv(M, tiling["BM"]) * triton.cdiv(N, tiling["BN"])
    if _INTERPRETER:
        programs = _INTERPRETER_PROGRAMS
    else:
        programs = torch.cuda.get_device_properties(x8.device).multi_processor_count
    group_k = in_features if group_size == -1 else group_size
    w4ax_gemm_kernel[(min(tiles, programs),)](
        x8, x4, x_scales, w_packed, w_scales, bias, y, M, N, in_features, a8, x4.shape[1], w_packed.shape[0],
        x_scales.shape[1], group_k, HAS_BIAS=bias is not None, STEP=step_size(group_size), ABLOCK=BLOCK,
        GROUP_M=8, **tiling,
    )
    return y


def w4ax_linear_triton(x: torch.Tensor, perm: torch.Tensor, a8_channels: int, w_packed: torch.Tensor,
                       w_scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype`` (:func:`~.reference.w4ax_linear_reference` on the GPU)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"w4ax_linear_triton takes fp16, bf16 or fp32 activations, got {x.dtype}; cast x first.")
    in_features = x.shape[-1]
    x8, x4, x_scales = quantize_activations_triton(x.reshape(-1, in_features), perm, a8_channels)
    y = w4ax_matmul_triton(x8, x4, x_scales, w_packed, w_scales, in_features, group_size, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w_packed.shape[1])

