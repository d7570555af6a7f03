"""Triton bit-plane GEMM for bipolar-INT weights (1..8 bits), with float or bipolar-INT (1..8 bit) activations.

Layout (:func:`~.reference.pack_for_triton`, once at load time): the weight's +-1 planes as int32 words
``[w_bits, ceil(K/32), N]``: plane-major, bit ``j`` of word ``(i, w, n)`` is plane ``i`` of input ``32 w + j`` of
output ``n``. A ``[BK, BN]`` weight tile of one plane is ``BK / 32`` rows of ``BN`` contiguous words: coalesced
wide loads, one bit per weight per plane and nothing else on the weight stream.

Two products, both recovering the planes' weighted sum in registers, inside the K loop (no plane result ever
leaves the chip):

- **A16** (weight-only, fp16/bf16/fp32 activations): the planes of a tile are rebuilt into the bipolar values
  ``v = sum_i 2^i p_i`` (exact in fp16 and bf16: ``|v| <= 255``), which feed one float ``tl.dot``; the group
  scale multiplies the tile's partial and the group offset the tile's activation row sums.
- **AxW** (activations quantized per token to bipolar integers): Triton has no 1-bit MMA, so planes are grouped
  into chunks of at most 7 (``planes_per_chunk``) whose values ``sum_{i in chunk} 2^(i - first) p_i`` fit int8;
  every activation-chunk x weight-chunk pair is one int8 ``tl.dot`` with int32 accumulation, shifted by
  ``2^(first_a + first_w)`` and summed. With one plane per chunk this is the paper's decomposition
  ``sum_ij 2^(i+j) A_j B_i`` term by term (``a_bits * w_bits`` dots); with seven, one dot covers up to 7x7 bits,
  which is what int8 tensor cores make cheapest. Each K tile lies in one quantization group, so its integer
  partial (at most ``255 * 255 * 128``, exact in fp32) is scaled once.

Activations are quantized by :func:`quantize_activation_chunks` (one program per token: absmax, round, split
into int8 chunks), the same numbers as :func:`~.reference.quantize_activations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .._tiles import dot_dtype, grouped_tile
from .reference import MAX_BITS

__all__ = ["BitplaneConfig", "bipolar_linear_triton", "bitplane_matmul_triton", "quantize_activation_chunks",
           "split_chunks"]

WORD_BITS = 32
INT8_PLANES = 7
"""The most +-1 planes whose weighted sum fits int8 (``|v| <= 127``)."""

_INTERPRETER = triton_interpreter()


@dataclass(frozen=True)
class BitplaneConfig:
    """Fixes the tiling of one call instead of autotuning it (GPU) or the interpreter's defaults.

    Args:
        block_m, block_n (int): powers of two >= 16 (``tl.dot`` minimum).
        block_k (int): a power of two >= 32 (whole words) dividing the group size.
        num_warps, num_stages (int): GPU launch parameters.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _plane_bits(p_w, m_w, BK: tl.constexpr, BN: tl.constexpr):
    """``[BK // 32, BN]`` int32 words at ``p_w`` -> their bits ``[BK, BN]`` (int32 0/1), row ``32 w + j``."""
    b_words = tl.load(p_w, mask=m_w, other=0)
    shifts = tl.arange(0, 32)
    b_bits = (b_words[:, None, :] >> shifts[None, :, None]) & 1
    return tl.reshape(b_bits, (BK, BN))


@triton.jit
def _chunk_values(p_w, m_w, PLANE, FIRST: tl.constexpr, CHUNK: tl.constexpr, PLANES: tl.constexpr,
                  BK: tl.constexpr, BN: tl.constexpr):
    """Bipolar values ``sum_i 2^i p_(FIRST + i)`` over planes ``FIRST .. min(FIRST + CHUNK, PLANES) - 1`` as
    int32 ``[BK, BN]``; ``PLANE`` is the plane stride of the words at ``p_w``."""
    b_v = tl.zeros([BK, BN], dtype=tl.int32)
    for i in tl.static_range(CHUNK):
        if FIRST + i < PLANES:
            b_v += (2 * _plane_bits(p_w + (FIRST + i) * PLANE, m_w, BK, BN) - 1) << i
    return b_v


@triton.jit
def _tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets (int64) of this program's output tile (see :func:`grouped_tile`)."""
    i_m, i_n = grouped_tile(M, N, BM, BN, GROUP_M)
    return i_m.to(tl.int64) * BM + tl.arange(0, BM), i_n.to(tl.int64) * BN + tl.arange(0, BN)


@triton.jit
def bitplane_a16_kernel(
    x, w, scales, offsets, bias, y, M, N, K, G, KW, M_BUCKET,
    W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y [M, N] = x [M, K] @ (scales * V + offsets)^T (+ bias)``, float activations. Grid ``(tiles,)``.

    ``w``: words ``[W_BITS, KW, N]``; ``scales``, ``offsets``: fp32 ``[groups, N]``; every K tile lies in one
    group (``G % BK == 0`` or ``G >= K``). ``M_BUCKET`` is only the autotuning key.
    """
    o_m, o_n = _tile_offsets(M, N, BM, BN, GROUP_M)
    o_k = tl.arange(0, BK).to(tl.int64)
    o_kw = tl.arange(0, BK // 32).to(tl.int64)
    m_m, m_n = o_m < M, o_n < N
    PLANE = KW * N
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        m_k = (k0 + o_k) < K
        b_x = tl.load(x + o_m[:, None] * K + (k0 + o_k)[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
        m_w = ((k0 // 32 + o_kw) < KW)[:, None] & m_n[None, :]
        p_w = w + (k0 // 32 + o_kw)[:, None] * N + o_n[None, :]
        b_v = _chunk_values(p_w, m_w, PLANE, 0, W_BITS, W_BITS, BK, BN).to(DT)
        i_g = k0 // G
        b_s = tl.load(scales + i_g * N + o_n, mask=m_n, other=0.)
        b_o = tl.load(offsets + i_g * N + o_n, mask=m_n, other=0.)
        if DT == tl.float32:
            b_dot = tl.dot(b_x.to(DT), b_v, input_precision="ieee")
        else:
            b_dot = tl.dot(b_x.to(DT), b_v)
        # Integers in the dot, scale and offset on the partial: only the fp32 sums round.
        b_acc += b_dot * b_s[None, :] + tl.sum(b_x.to(tl.float32), axis=1)[:, None] * b_o[None, :]
    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
    tl.store(y + o_m[:, None] * N + o_n[None, :], b_acc.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _int_tile(p_a, m_a, MK, p_w, m_w, PLANE, A_BITS: tl.constexpr, W_BITS: tl.constexpr,
              A_CHUNK: tl.constexpr, W_CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One K tile's exact integer product ``sum_(a, b chunks) 2^(first_a + first_b) A_a B_b^T`` int32 ``[BM, BN]``
    and the tile's activation row sums int32 ``[BM]``.

    ``p_a``/``m_a``: pointers/mask of chunk 0's ``[BM, BK]`` int8 tile, ``MK`` the chunk stride; ``p_w``/``m_w``:
    plane 0's ``[BK // 32, BN]`` words, ``PLANE`` the plane stride.
    """
    b_int = tl.zeros([BM, BN], dtype=tl.int32)
    b_rows = tl.zeros([BM], dtype=tl.int32)
    for c_w in tl.static_range(0, W_BITS, W_CHUNK):
        b_w = _chunk_values(p_w, m_w, PLANE, c_w, W_CHUNK, W_BITS, BK, BN).to(tl.int8)
        for c_a in tl.static_range(0, A_BITS, A_CHUNK):
            b_a = tl.load(p_a + (c_a // A_CHUNK) * MK, mask=m_a, other=0)
            b_int += tl.dot(b_a, b_w, out_dtype=tl.int32) << (c_a + c_w)
            if c_w == 0:
                b_rows += tl.sum(b_a.to(tl.int32), axis=1) << c_a
    return b_int, b_rows


@triton.jit
def bitplane_axw_kernel(
    xa, x_scale, w, scales, offsets, bias, y, M, N, K, G, KW, M_BUCKET,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, A_CHUNK: tl.constexpr, W_CHUNK: tl.constexpr,
    INTEGER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Bipolar activations x bipolar weights. Grid ``(tiles,)``.

    ``xa``: int8 activation chunks ``[ceil(A_BITS / A_CHUNK), M, K]``; ``w``: words ``[W_BITS, KW, N]``.
    ``INTEGER_OUT``: ``y`` int32 ``[M, N]`` is the exact product ``V_x V_w^T`` (scales, offsets and bias unused).
    Otherwise ``y = x_scale [M] * sum_groups (scales * (V_x V_w^T)_group + rowsum_group(V_x) * offsets) + bias``,
    every K tile in one group.
    """
    o_m, o_n = _tile_offsets(M, N, BM, BN, GROUP_M)
    o_k = tl.arange(0, BK).to(tl.int64)
    o_kw = tl.arange(0, BK // 32).to(tl.int64)
    m_m, m_n = o_m < M, o_n < N
    PLANE = KW * N
    MK = tl.cast(M, tl.int64) * K
    b_exact = tl.zeros([BM, BN], dtype=tl.int32)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        m_a = m_m[:, None] & ((k0 + o_k) < K)[None, :]
        p_a = xa + o_m[:, None] * K + (k0 + o_k)[None, :]
        m_w = ((k0 // 32 + o_kw) < KW)[:, None] & m_n[None, :]
        p_w = w + (k0 // 32 + o_kw)[:, None] * N + o_n[None, :]
        b_int, b_rows = _int_tile(p_a, m_a, MK, p_w, m_w, PLANE, A_BITS, W_BITS, A_CHUNK, W_CHUNK, BM, BN, BK)
        if INTEGER_OUT:
            b_exact += b_int
        else:
            i_g = k0 // G
            b_s = tl.load(scales + i_g * N + o_n, mask=m_n, other=0.)
            b_o = tl.load(offsets + i_g * N + o_n, mask=m_n, other=0.)
            b_acc += b_int.to(tl.float32) * b_s[None, :] + b_rows.to(tl.float32)[:, None] * b_o[None, :]
    m_y = m_m[:, None] & m_n[None, :]
    if INTEGER_OUT:
        tl.store(y + o_m[:, None] * N + o_n[None, :], b_exact, mask=m_y)
    else:
        b_acc *= tl.load(x_scale + o_m, mask=m_m, other=0.)[:, None]
        if HAS_BIAS:
            b_acc += tl.load(bias + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        tl.store(y + o_m[:, None] * N + o_n[None, :], b_acc.to(y.dtype.element_ty), mask=m_y)


@triton.jit
def quantize_activations_kernel(x, xa, x_scale, M, K, A_BITS: tl.constexpr, A_CHUNK: tl.constexpr,
                                BK: tl.constexpr):
    """Row ``m`` of ``x [M, K]`` -> its bipolar ``A_BITS``-bit values split into int8 chunks ``xa [chunks, M, K]``
    and its scale ``x_scale [M]`` (absmax / (2^A_BITS - 1)), as :func:`~.reference.quantize_activations`."""
    i_m = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BK)
    b_max = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        b_x = tl.load(x + i_m * K + k0 + o_k, mask=(k0 + o_k) < K, other=0.).to(tl.float32)
        b_max = tl.maximum(b_max, tl.abs(b_x))
    # div_rn, not "/": Triton's fp32 "/" is div.full.f32 on NVIDIA (up to 2 ulp), torch's is IEEE, and one ulp
    # moves values across rounding ties. Both operands are blocks (every lane holds the same scale).
    b_zero = tl.zeros([BK], dtype=tl.float32)
    b_scale = tl.div_rn(b_zero + tl.maximum(tl.max(b_max, axis=0), 1.1754943508222875e-38),
                        b_zero + ((1 << A_BITS) - 1))
    tl.store(x_scale + i_m, tl.max(b_scale, axis=0))
    MK = tl.cast(M, tl.int64) * K
    for k0 in range(0, K, BK):
        m_k = (k0 + o_k) < K
        b_x = tl.load(x + i_m * K + k0 + o_k, mask=m_k, other=0.).to(tl.float32)
        b_r = tl.div_rn(b_x, b_scale)
        # Nearest odd integer, ties away from zero, clamped: round_to_bipolar.
        b_mag = tl.minimum(tl.floor(tl.abs(b_r) * 0.5) * 2 + 1, ((1 << A_BITS) - 1) * 1.0)
        b_v = tl.where(b_r < 0, -b_mag, b_mag).to(tl.int32)
        b_u = (b_v + ((1 << A_BITS) - 1)) >> 1  # the unsigned code, whose bits are the planes
        for c in tl.static_range(0, A_BITS, A_CHUNK):
            b_c = tl.zeros([BK], dtype=tl.int32)
            for i in tl.static_range(A_CHUNK):
                if c + i < A_BITS:
                    b_c += (2 * ((b_u >> (c + i)) & 1) - 1) << i
            tl.store(xa + (c // A_CHUNK) * MK + i_m * K + k0 + o_k, b_c.to(tl.int8), mask=m_k)


def _configs() -> list[triton.Config]:
    # (BM, BN, BK, num_warps, num_stages): BM = 16 rows serve decode (the weight stream dominates, padded rows
    # cost nothing); narrow BN gives a 4096-wide GEMV enough programs for 132 SMs without a split-K pass.
    table = [
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 64, 256, 4, 3),
        (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 32, 4, 4), (16, 64, 32, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in table]


def _fits_groups(block_k: int, K: int, G: int) -> bool:
    """Every K tile of ``block_k`` lies inside one quantization group of ``G`` (groups start at multiples of G)."""
    return G % block_k == 0 or G >= K


def _prune(configs, named_args, **kwargs):
    K, G, M_BUCKET = named_args["K"], named_args["G"], named_args["M_BUCKET"]
    fitting = [c for c in configs if _fits_groups(c.kwargs["BK"], K, G)]
    return [c for c in fitting if c.kwargs["BM"] <= max(16, M_BUCKET)] or fitting


CONFIGS = _configs()
_TUNED_A16 = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                             prune_configs_by={"early_config_prune": _prune})(bitplane_a16_kernel)
_TUNED_AXW = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                             prune_configs_by={"early_config_prune": _prune})(bitplane_axw_kernel)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _default_blocks(M: int, N: int, K: int, G: int) -> dict[str, int]:
    """The tiling without autotuning: big blocks under the interpreter (its cost is per program and per step)."""
    block_k = next(bk for bk in (128, 64, 32) if _fits_groups(bk, K, G) or bk == 32)
    if _INTERPRETER:
        return {"BM": min(64, max(16, triton.next_power_of_2(M))), "BN": min(128, max(16, triton.next_power_of_2(N))),
                "BK": block_k}
    return {"BM": 16 if M <= 16 else 64, "BN": 64, "BK": block_k, "num_warps": 4, "num_stages": 3}


def _blocks(M: int, N: int, K: int, G: int, config: BitplaneConfig) -> dict[str, int]:
    """The explicit tiling of ``config`` (checked), for calls that do not autotune."""
    blocks = {"BM": config.block_m, "BN": config.block_n, "BK": config.block_k}
    for name, value, least in (("block_m", config.block_m, 16), ("block_n", config.block_n, 16),
                               ("block_k", config.block_k, WORD_BITS)):
        if value < least or value & (value - 1):
            raise ValueError(f"BitplaneConfig.{name} must be a power of two >= {least} (tl.dot tiles, whole "
                             f"32-bit plane words), got {value}; pick from 16, 32, 64, 128, 256.")
    if not _fits_groups(config.block_k, K, G):
        raise ValueError(f"BitplaneConfig.block_k={config.block_k} must divide the group size {G} so each K tile "
                         "is one group; pick a divisor of it.")
    if not _INTERPRETER:
        blocks.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return blocks


def _launch(tuned, M: int, N: int, K: int, G: int, config: BitplaneConfig | None, *args, **constexprs) -> None:
    """Run ``tuned`` (an autotuned kernel) on the GPU's tuned tiling, or ``tuned.fn`` on a fixed one."""
    if config is not None or _INTERPRETER:
        blocks = _default_blocks(M, N, K, G) if config is None else _blocks(M, N, K, G, config)
        grid = (triton.cdiv(M, blocks["BM"]) * triton.cdiv(N, blocks["BN"]),)
        tuned.fn[grid](*args, **constexprs, **blocks)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    tuned[grid](*args, **constexprs)


def _check_bits(name: str, bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"{name} must be an int in 1..{MAX_BITS}, got {bits!r}.")


def _check_chunk(planes_per_chunk: int) -> None:
    if not (isinstance(planes_per_chunk, int) and 1 <= planes_per_chunk <= INT8_PLANES):
        raise ValueError(f"planes_per_chunk must be an int in 1..{INT8_PLANES} (the planes one int8 operand holds), "
                         f"got {planes_per_chunk!r}.")


def quantize_activation_chunks(
    x2d: torch.Tensor, a_bits: int, planes_per_chunk: int = INT8_PLANES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2d [M, K]`` float -> (int8 chunks ``[ceil(a_bits / planes_per_chunk), M, K]``, fp32 scales ``[M]``):
    per-token bipolar quantization, each chunk the bipolar value of ``planes_per_chunk`` consecutive planes."""
    _check_bits("a_bits", a_bits)
    _check_chunk(planes_per_chunk)
    M, K = x2d.shape
    chunks = _new_output((-(-a_bits // planes_per_chunk), M, K), torch.int8, x2d.device)
    scales = _new_output((M,), torch.float32, x2d.device)
    block_k = min(1024, triton.next_power_of_2(K))
    quantize_activations_kernel[(M,)](x2d.contiguous(), chunks, scales, M, K, A_BITS=a_bits,
                                      A_CHUNK=planes_per_chunk, BK=block_k)
    return chunks, scales


def split_chunks(values: torch.Tensor, bits: int, planes_per_chunk: int = INT8_PLANES) -> torch.Tensor:
    """Bipolar values ``[M, K]`` -> int8 ``[chunks, M, K]``: chunk ``c`` is ``sum_i 2^i p_(c * per + i)`` over its
    planes, so ``values = sum_c 2^(c * per) chunk_c``."""
    codes = (values.to(torch.int32) + (1 << bits) - 1) // 2
    chunks = []
    for first in range(0, bits, planes_per_chunk):
        count = min(planes_per_chunk, bits - first)
        chunks.append(2 * ((codes >> first) & ((1 << count) - 1)) - ((1 << count) - 1))
    return torch.stack(chunks).to(torch.int8)


def bitplane_matmul_triton(
    a_values: torch.Tensor, a_bits: int, words: torch.Tensor, w_bits: int, planes_per_chunk: int = INT8_PLANES,
    config: BitplaneConfig | None = None,
) -> torch.Tensor:
    """The exact integer product ``V_a V_w^T`` of bipolar activations ``a_values [M, K]`` (``a_bits``) and the
    weight planes ``words [w_bits, ceil(K/32), N]`` (:func:`~.reference.pack_for_triton`) -> int32 ``[M, N]``, by
    bit-plane decomposition and in-register recovery (the Triton counterpart of
    :func:`~.reference.bitplane_matmul_reference`)."""
    _check_bits("a_bits", a_bits)
    _check_bits("w_bits", w_bits)
    _check_chunk(planes_per_chunk)
    M, K = a_values.shape
    N = words.shape[2]
    chunks = split_chunks(a_values, a_bits, planes_per_chunk).contiguous()
    y = _new_output((M, N), torch.int32, a_values.device)
    _launch(_TUNED_AXW, M, N, K, K, config, chunks, None, words, None, None, None, y, M, N, K, K, words.shape[1],
            triton.next_power_of_2(M), A_BITS=a_bits, W_BITS=w_bits, A_CHUNK=planes_per_chunk,
            W_CHUNK=planes_per_chunk, INTEGER_OUT=True, HAS_BIAS=False, GROUP_M=8)
    return y


def bipolar_linear_triton(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
    group_size: int, act_bits: int | None, bias: torch.Tensor | None = None, planes_per_chunk: int = INT8_PLANES,
    config: BitplaneConfig | None = None,
) -> torch.Tensor:
    """``y = x W^T + bias`` with ``W = scales * V + offsets`` per group (:func:`~.reference.bipolar_linear_reference`).

    Args:
        x: ``[..., in_features]`` fp16, bf16 or fp32.
        words: the planes of ``V`` from :func:`~.reference.pack_for_triton`, int32 ``[w_bits, ceil(in/32), out]``.
        scales, offsets: fp32 ``[groups, out]``.
        group_size: 32, 64, 128, ... or -1 (one group).
        act_bits: None (weight-only, the A16 kernel) or 1..8 (per-token bipolar activations, the int8 kernel).
        planes_per_chunk: planes per int8 operand of the AxW kernel: 7 (fastest) down to 1 (one dot per plane pair).

    Returns ``[..., out]`` in x's dtype.
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bipolar_linear_triton takes fp16, bf16 or fp32 activations, got {x.dtype}; cast x first.")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {in_features}; check the layer.")
    w_bits, N = words.shape[0], words.shape[2]
    G = in_features if group_size == -1 else group_size
    x2d = x.reshape(-1, in_features).contiguous()
    M = x2d.shape[0]
    y = _new_output((M, N), x.dtype, x.device)
    scales, offsets = scales.float().contiguous(), offsets.float().contiguous()
    common = (M, N, in_features, G, words.shape[1], triton.next_power_of_2(M))
    if act_bits is None:
        _launch(_TUNED_A16, M, N, in_features, G, config, x2d, words, scales, offsets, bias, y, *common,
                W_BITS=w_bits, HAS_BIAS=bias is not None, DT=dot_dtype(x.dtype), GROUP_M=8)
    else:
        chunks, token_scales = quantize_activation_chunks(x2d, act_bits, planes_per_chunk)
        _launch(_TUNED_AXW, M, N, in_features, G, config, chunks, token_scales, words, scales, offsets, bias, y,
                *common, A_BITS=act_bits, W_BITS=w_bits, A_CHUNK=planes_per_chunk, W_CHUNK=planes_per_chunk,
                INTEGER_OUT=False, HAS_BIAS=bias is not None, GROUP_M=8)
    return y.reshape(*x.shape[:-1], N)
