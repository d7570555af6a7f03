"""Triton AWQ W4A16 GEMM: ``y = x @ dequant(qweight, qzeros, scales)`` for the AWQ "GEMM" layout.

The layout is documented in :mod:`hf_plugins.kernels.awq_gemm.reference` (the oracle). Three routes share one
in-register dequantizer, which turns nibbles into ``q - z`` exactly in the dot dtype (two fp16/bf16 values per
32-bit mask-and-or, no int -> float conversion instructions):

- ``gemv``: split-K skinny kernel for decode (M <= 16 by default). Each program streams a ``[K / SPLIT_K, BN]``
  slab of packed weights once into a ``tl.dot`` whose M block is padded to 16, and applies the group scale to
  the fp32 partial. The K splits are reduced in fp32 inside the same launch: each split stores an fp32
  partial, and the last split to arrive at an output tile (an atomic counter, as in CUTLASS's serial split-K)
  sums them in a fixed order and casts once. No fp16 atomics, deterministic, no second kernel launch.
- ``gemm``: tiled kernel for prefill: scales the dequantized ``[BK, BN]`` tile in registers and feeds ``tl.dot``
  with a chained fp32 accumulator.
- ``dequant``: dequantize the whole weight once to ``x.dtype`` and call ``torch.matmul`` (cuBLAS); the known
  fast route for M >= ~1024 where the GEMM is compute-bound (AutoAWQ / vLLM PR #2566 threshold).

fp32 activations take an exact fp32 route everywhere: correct, not fast (Triton's fp32 "ieee" dot runs on FMA
units and spills registers at these tiles); bf16 activations take it under the interpreter only.

On a GPU, block sizes come from ``@triton.autotune``; under the Triton interpreter (``TRITON_INTERPRET=1`` at
import) multi-config autotuning cannot run, so a single un-tuned config with large blocks is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .._tiles import dot_dtype, grouped_tile

__all__ = ["AwqGemmConfig", "KERNELS", "awq_gemm_triton", "dispatch"]

KERNELS = ("auto", "gemv", "gemm", "dequant")
"""Values of :attr:`AwqGemmConfig.kernel`."""

GEMV_MAX_M = 16
"""``auto`` picks the split-K GEMV for ``M <= GEMV_MAX_M`` (decode)."""

DEQUANT_MIN_M = 1024
"""``auto`` picks dequantize + ``torch.matmul`` for ``M >= DEQUANT_MIN_M`` (AutoAWQ / vLLM threshold)."""

_INTERPRETER = triton_interpreter()
_SUPPORTED_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AwqGemmConfig:
    """Forces a route and, optionally, its tiling. Unset block sizes are autotuned (GPU) or defaulted.

    Args:
        kernel (str): ``auto`` (pick by M, see :func:`dispatch`), ``gemv``, ``gemm`` or ``dequant``.
            Default: ``auto``.
        block_m (int, Optional): rows of ``x`` per program, a power of two >= 16 (``tl.dot`` minimum).
        block_n (int, Optional): output columns per program, a power of two >= 16.
        block_k (int, Optional): input channels per loop step, a power of two >= 16.
        split_k (int, Optional): ``gemv`` only: number of K slices reduced in fp32.
        num_warps (int, Optional): GPU warps per program. Default: 4 when a tiling is given.
        num_stages (int, Optional): GPU software-pipelining depth. Default: 3 when a tiling is given.

    Any block size given switches off autotuning for that call: missing ones take fixed defaults.
    """

    kernel: str = "auto"
    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    @property
    def explicit(self) -> bool:
        """True when the caller fixed at least one block size (no autotuning)."""
        return any(v is not None for v in (self.block_m, self.block_n, self.block_k, self.split_k))


def dispatch(M: int, kernel: str = "auto") -> str:
    """The route for ``M`` rows: ``gemv`` for decode, ``dequant`` for big prefills, ``gemm`` in between."""
    if kernel != "auto":
        return kernel
    if M <= GEMV_MAX_M:
        return "gemv"
    if M >= DEQUANT_MIN_M:
        return "dequant"
    return "gemm"


@triton.jit
def _unpack_f32(b_packed, BN: tl.constexpr):
    """``[R, BN // 8]`` int32 words -> ``[R, BN]`` fp32 ``2^23 + nibble`` in channel order (exact)."""
    # Channel c sits in nibble AWQ_REVERSE_ORDER[c % 8] = (c % 8) // 2 + 4 * (c % 2).
    o_c = tl.arange(0, BN) % 8
    o_shift = (o_c // 2 + (o_c % 2) * 4) * 4
    # Three self-interleaves repeat every word 8 times, so column c of the result sees the word of channel c.
    b_words = tl.interleave(b_packed, b_packed)
    b_words = tl.interleave(b_words, b_words)
    b_words = tl.interleave(b_words, b_words)
    # OR-ing the nibble into the mantissa of 2^23 (0x4B000000) converts it exactly without the slow I2F
    # instruction; the 2^23 bias cancels against the zero point's.
    return (((b_words >> o_shift[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _half(b_bits, DT: tl.constexpr):
    """Low 16 bits of each int32 as a DT (fp16 or bf16) value."""
    return b_bits.to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _unpack_half(b_packed, DT: tl.constexpr):
    """``[R, BN // 8]`` int32 words -> ``[R, BN]`` DT ``magic + nibble`` in channel order (exact).

    AWQ's order puts channels 2t and 2t + 1 in nibbles t and t + 4: bits 4t.. of the low and of the high 16-bit
    half. One mask-and-or per shift therefore builds two half floats at once (the lop3 trick of the CUDA AWQ
    kernels): ``0x6400 | q`` is fp16 ``1024 + q`` and ``0x4300 | q`` is bf16 ``128 + q``. This roughly halves
    the instructions per weight compared with the fp32 route, which is what a bandwidth-bound GEMV needs.
    """
    if DT == tl.float16:
        MAGIC = 0x64006400
    else:
        MAGIC = 0x43004300
    b_p0 = (b_packed & 0x000F000F) | MAGIC
    b_p1 = ((b_packed >> 4) & 0x000F000F) | MAGIC
    b_p2 = ((b_packed >> 8) & 0x000F000F) | MAGIC
    b_p3 = ((b_packed >> 12) & 0x000F000F) | MAGIC
    # Column 8w + 4u + 2v + j must hold pair t = 2u + v, half j (channel 2t + j): interleave v, then u, then j.
    b_lo = tl.interleave(tl.interleave(_half(b_p0, DT), _half(b_p2, DT)),
                         tl.interleave(_half(b_p1, DT), _half(b_p3, DT)))
    b_hi = tl.interleave(tl.interleave(_half(b_p0 >> 16, DT), _half(b_p2 >> 16, DT)),
                         tl.interleave(_half(b_p1 >> 16, DT), _half(b_p3 >> 16, DT)))
    return tl.interleave(b_lo, b_hi)


@triton.jit
def _awq_load_tile(p_q, m_q, qzeros, scales, k0, o_k, o_n, o_nw, m_k, m_n, m_nw, N, NW, G,
                   BN: tl.constexpr, DT: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Packed rows at ``p_q [BK, BN // 8]`` (first row ``k0``), dequantized but not yet scaled.

    Returns ``q - z`` in DT ``[BK, BN]`` (exact: integers in [-15, 15]) and the fp32 scales: ``[1, BN]`` when
    ``ONE_GROUP`` (the tile lies inside one group), else ``[BK, BN]``.
    """
    b_q = tl.load(p_q, mask=m_q, other=0)
    if ONE_GROUP:
        # One row of zeros and scales serves all BK rows, which keeps scale traffic off the load units.
        i_g = k0 // G
        b_z = tl.load(qzeros + i_g * NW + o_nw[None, :], mask=m_nw[None, :], other=0)
        b_s = tl.load(scales + i_g * N + o_n[None, :], mask=m_n[None, :], other=0.).to(tl.float32)
    else:
        o_g = o_k // G
        b_z = tl.load(qzeros + o_g[:, None] * NW + o_nw[None, :], mask=m_q, other=0)
        b_s = tl.load(scales + o_g[:, None] * N + o_n[None, :], mask=m_k[:, None] & m_n[None, :],
                      other=0.).to(tl.float32)
    if DT == tl.float32:
        b_qz = _unpack_f32(b_q, BN) - _unpack_f32(b_z, BN)
    else:
        b_qz = _unpack_half(b_q, DT) - _unpack_half(b_z, DT)
    return b_qz, b_s


@triton.jit
def _dot(b_x, b_w, b_acc, DT: tl.constexpr):
    """``b_acc + b_x @ b_w`` with fp32 accumulation (``b_acc`` may be None); both operands in DT."""
    if DT == tl.float32:
        # "ieee" keeps fp32 exact on GPUs (the default would round both operands to tf32).
        b_y = tl.dot(b_x, b_w, b_acc, input_precision="ieee")
    else:
        b_y = tl.dot(b_x, b_w, b_acc)
    return b_y


def _one_group(args: dict) -> bool:
    """Every K tile lies in one quantization group: groups start at multiples of G, tiles at multiples of BK."""
    return args["G"] % args["BK"] == 0 or args["G"] >= args["K"]


def _gemv_prune(configs, named_args, **kwargs):
    """Keep GEMV configs with single-group tiles, then those whose K splits all get tiles."""
    K, G = named_args["K"], named_args["G"]
    single = [c for c in configs if G % c.kwargs["BK"] == 0 or G >= K] or configs
    return [c for c in single if c.kwargs["SPLIT_K"] <= triton.cdiv(K, c.kwargs["BK"])] or single


def _gemm_prune(configs, named_args, **kwargs):
    """Keep GEMM configs with single-group tiles and an M block no larger than the problem needs."""
    K, G, M_BUCKET = named_args["K"], named_args["G"], named_args["M_BUCKET"]
    single = [c for c in configs if G % c.kwargs["BK"] == 0 or G >= K] or configs
    return [c for c in single if c.kwargs["BM"] <= max(16, M_BUCKET)] or single


def _gemv_configs() -> list[triton.Config]:
    # (BN, BK, SPLIT_K, num_warps, num_stages): BN >= 64 keeps each packed row read >= one 32-byte sector;
    # SPLIT_K trades fp32 partial traffic and a final in-kernel sum for enough programs to fill 132 SMs at
    # N = 4096.
    table = [
        (64, 128, 1, 4, 4), (128, 128, 1, 8, 3),
        (64, 128, 4, 4, 4), (128, 64, 4, 4, 4), (128, 128, 4, 8, 3), (256, 64, 4, 8, 3),
        (128, 128, 8, 4, 3), (128, 64, 8, 4, 4), (64, 64, 16, 4, 4),
        (128, 32, 8, 4, 4), (64, 32, 16, 4, 4),
    ]
    return [triton.Config({"BN": bn, "BK": bk, "SPLIT_K": s}, num_warps=w, num_stages=st)
            for bn, bk, s, w, st in table]


def _gemm_configs() -> list[triton.Config]:
    # (BM, BN, BK, num_warps, num_stages); BK = 32 entries keep group_size 32 on the single-group path.
    table = [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 128, 4, 4),
        (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (32, 128, 32, 4, 3), (16, 128, 32, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in table]


def _dequant_configs() -> list[triton.Config]:
    table = [(32, 256, 4), (64, 128, 4), (128, 128, 8)]
    return [triton.Config({"BK": bk, "BN": bn}, num_warps=w) for bk, bn, w in table]


GEMV_CONFIGS = _gemv_configs()
GEMM_CONFIGS = _gemm_configs()
DEQUANT_CONFIGS = _dequant_configs()


@triton.autotune(configs=GEMV_CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                 prune_configs_by={"early_config_prune": _gemv_prune})
@triton.heuristics({"ONE_GROUP": _one_group})
@triton.jit
def awq_gemv_splitk_kernel(
    x, qweight, qzeros, scales, y, partials, counters, M, N, K, G, NW, M_BUCKET,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    DT: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    """Split-K skinny GEMM. Grid ``(cdiv(N, BN), SPLIT_K, cdiv(M, BM))``.

    x ``[M, K]``, qweight ``[K, N // 8]``, qzeros ``[groups, N // 8]``, scales ``[groups, N]`` -> y ``[M, N]``
    (x's dtype). With ``SPLIT_K > 1``, split ``i_s`` owns the contiguous K tiles ``[i_s * T, (i_s + 1) * T)``
    and stores its fp32 partial in ``partials [SPLIT_K, M, N]``; ``counters`` (int32, one per output tile,
    zero on entry and left zero on exit) count the splits that are done.

    ``NW = N // 8`` is passed on its own so Triton can specialise its divisibility by 16 and issue 16-byte
    loads of packed rows; ``M_BUCKET`` (next power of two of M) is only the autotuning key, since the best
    split depends on how many partial rows it writes; ``DT`` is the dot dtype. ``BM >= 16`` even for M = 1:
    the padded rows cost nothing next to the weight stream, and the tensor-core dot reduces over K without
    the cross-lane shuffles a register reduction needs on every tile.
    """
    i_n, i_s, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.cdiv(K, BK)
    T = tl.cdiv(NT, SPLIT_K)
    i_lo = i_s * T
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_nw = i_n.to(tl.int64) * (BN // 8) + tl.arange(0, BN // 8)
    o_k = i_lo.to(tl.int64) * BK + tl.arange(0, BK)
    m_m, m_n, m_nw = o_m < M, o_n < N, o_nw < NW
    # Pointers advance by one tile per step instead of being rebuilt from 64-bit row indices.
    p_q = qweight + o_k[:, None] * NW + o_nw[None, :]
    p_x = x + o_m[:, None] * K + o_k[None, :]

    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i_t in range(i_lo, tl.minimum(i_lo + T, NT)):
        m_k = o_k < K
        b_qz, b_s = _awq_load_tile(p_q, m_k[:, None] & m_nw[None, :], qzeros, scales, i_t * BK, o_k, o_n, o_nw,
                                   m_k, m_n, m_nw, N, NW, G, BN, DT, ONE_GROUP)
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.).to(DT)
        if ONE_GROUP:
            # Scale the [BM, BN] partial rather than the [BK, BN] tile: fewer multiplies, and q - z enters the
            # dot exactly, so the products are exact and only the fp32 sums round.
            b_acc += _dot(b_x, b_qz, None, DT) * b_s
        else:
            b_acc = _dot(b_x, b_qz * b_s.to(DT), b_acc, DT)
        p_q += BK * NW
        p_x += BK
        o_k += BK
    o_y = o_m[:, None] * N + o_n[None, :]
    m_y = m_m[:, None] & m_n[None, :]
    if SPLIT_K == 1:
        tl.store(y + o_y, b_acc.to(y.dtype.element_ty), mask=m_y)
    else:
        # tl.cast, not .to: Triton passes M == 1 as a plain int constant.
        MN = tl.cast(M, tl.int64) * N
        tl.store(partials + i_s * MN + o_y, b_acc, mask=m_y)
        # The barrier orders every thread's partial store before the counter's gpu-scope release (CUTLASS's
        # semaphore pattern); the last arrival acquires it, then reads the partials through L2 (.cg).
        tl.debug_barrier()
        p_c = counters + i_m * tl.num_programs(0) + i_n
        if tl.atomic_add(p_c, 1, sem="acq_rel") == SPLIT_K - 1:
            p_p = partials + o_y
            b_y = tl.zeros([BM, BN], dtype=tl.float32)
            for _ in range(SPLIT_K):
                b_y += tl.load(p_p, mask=m_y, other=0., cache_modifier=".cg")
                p_p += MN
            tl.store(y + o_y, b_y.to(y.dtype.element_ty), mask=m_y)
            # Every split of this tile has arrived, so nothing else touches the counter in this launch.
            tl.atomic_xchg(p_c, 0)


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                 prune_configs_by={"early_config_prune": _gemm_prune})
@triton.heuristics({"ONE_GROUP": _one_group})
@triton.jit
def awq_gemm_tiled_kernel(
    x, qweight, qzeros, scales, y, M, N, K, G, NW, M_BUCKET,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    DT: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    """Tiled GEMM with in-register dequantization. Grid ``(cdiv(M, BM) * cdiv(N, BN),)``.

    x ``[M, K]``, qweight ``[K, N // 8]``, qzeros ``[groups, N // 8]``, scales ``[groups, N]`` -> y ``[M, N]``.
    ``NW = N // 8``; ``M_BUCKET`` (next power of two of M) is only the autotuning key, so prompt lengths share
    tunings; ``DT`` is the dot dtype.
    """
    i_m, i_n = grouped_tile(M, N, BM, BN, GROUP_M)

    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_nw = i_n.to(tl.int64) * (BN // 8) + tl.arange(0, BN // 8)
    o_k = tl.arange(0, BK).to(tl.int64)
    m_m, m_n, m_nw = o_m < M, o_n < N, o_nw < NW
    p_q = qweight + o_k[:, None] * NW + o_nw[None, :]
    p_x = x + o_m[:, None] * K + o_k[None, :]

    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(K, BK)):
        m_k = o_k < K
        b_qz, b_s = _awq_load_tile(p_q, m_k[:, None] & m_nw[None, :], qzeros, scales, i_t * BK, o_k, o_n, o_nw,
                                   m_k, m_n, m_nw, N, NW, G, BN, DT, ONE_GROUP)
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.).to(DT)
        # Scaling the tile (not the partial) keeps the accumulator chained through tl.dot, which lets Hopper
        # overlap consecutive wgmma steps. fp16 rounds (q - z) * s once, as an fp32 product cast to fp16 would;
        # bf16 also rounds an fp16 scale to bf16 first.
        b_acc = _dot(b_x, b_qz * b_s.to(DT), b_acc, DT)
        p_q += BK * NW
        p_x += BK
        o_k += BK
    tl.store(y + o_m[:, None] * N + o_n[None, :], b_acc.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.autotune(configs=DEQUANT_CONFIGS, key=["N", "K", "G"])
@triton.heuristics({"ONE_GROUP": _one_group})
@triton.jit
def awq_dequant_kernel(qweight, qzeros, scales, w, N, K, G, NW,
                       BK: tl.constexpr, BN: tl.constexpr, ONE_GROUP: tl.constexpr):
    """``w [K, N] = dequant(qweight, qzeros, scales)`` in w's dtype. Grid ``(cdiv(K, BK), cdiv(N, BN))``."""
    i_k, i_n = tl.program_id(0), tl.program_id(1)
    k0 = i_k * BK
    o_k = k0 + tl.arange(0, BK).to(tl.int64)
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_nw = i_n.to(tl.int64) * (BN // 8) + tl.arange(0, BN // 8)
    m_k, m_n, m_nw = o_k < K, o_n < N, o_nw < NW
    # fp32 dequantization: this route is bound by writing W, so exactness costs nothing.
    b_qz, b_s = _awq_load_tile(qweight + o_k[:, None] * NW + o_nw[None, :], m_k[:, None] & m_nw[None, :], qzeros,
                               scales, k0, o_k, o_n, o_nw, m_k, m_n, m_nw, N, NW, G, BN, tl.float32, ONE_GROUP)
    tl.store(w + o_k[:, None] * N + o_n[None, :], (b_qz * b_s).to(w.dtype.element_ty),
             mask=m_k[:, None] & m_n[None, :])


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2_at_least_16(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(
            f"{name} must be a power of two >= 16 (tl.arange needs powers of two and every tl.dot dimension "
            f"needs >= 16 on GPUs), got {value}; pick 16, 32, 64, 128 or 256."
        )


def _check_blocks(kernel: str, BM: int | None, BN: int, BK: int, SPLIT_K: int | None = None) -> None:
    """Tile constraints that the GPU compiler enforces but the interpreter does not (tl.dot dims >= 16)."""
    if BM is not None:
        _pow2_at_least_16("block_m", BM)
    _pow2_at_least_16("block_n", BN)
    _pow2_at_least_16("block_k", BK)
    if SPLIT_K is not None and SPLIT_K < 1:
        raise ValueError(f"split_k must be >= 1, got {SPLIT_K}; use 1 to skip the split-K reduction.")


def _check_config_tables() -> None:
    """The autotuner skips configs that fail to compile, so catch illegal tiles at import instead."""
    for c in GEMV_CONFIGS:
        _check_blocks("gemv", None, c.kwargs["BN"], c.kwargs["BK"], c.kwargs["SPLIT_K"])
    for c in GEMM_CONFIGS:
        _check_blocks("gemm", c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"])
    for c in DEQUANT_CONFIGS:
        _check_blocks("dequant", None, c.kwargs["BN"], c.kwargs["BK"])


_check_config_tables()


def _gemv_block_m(M: int) -> int:
    """Pad M up to the 16-row minimum of tl.dot; cap at 64 rows (more rows go to more programs)."""
    return min(64, max(16, triton.next_power_of_2(M)))


def _default_blocks(kernel: str, M: int, N: int, K: int) -> dict[str, int]:
    """Fixed tiling when autotuning is off: big blocks and 1-4 programs under the interpreter (its cost is per
    program and per loop step), GPU-friendly sizes otherwise."""
    if _INTERPRETER:
        BN = min(256, max(16, triton.next_power_of_2(N)))
        BK = min(128, max(16, triton.next_power_of_2(K)))
        if kernel == "gemv":
            return {"BM": _gemv_block_m(M), "BN": BN, "BK": BK, "SPLIT_K": min(2, triton.cdiv(K, BK))}
        if kernel == "gemm":
            return {"BM": min(64, max(16, triton.next_power_of_2(M))), "BN": BN, "BK": BK}
        return {"BN": BN, "BK": BK}
    if kernel == "gemv":
        return {"BM": _gemv_block_m(M), "BN": 128, "BK": 64, "SPLIT_K": 4}
    if kernel == "gemm":
        return {"BM": 64, "BN": 128, "BK": 64}
    return {"BN": 128, "BK": 64}


def _explicit_blocks(kernel: str, M: int, N: int, K: int, config: AwqGemmConfig) -> dict[str, int]:
    """Merge the caller's block sizes over the defaults and check them."""
    blocks = _default_blocks(kernel, M, N, K)
    given = {"BM": config.block_m, "BN": config.block_n, "BK": config.block_k, "SPLIT_K": config.split_k}
    blocks.update({k: v for k, v in given.items() if v is not None and k in blocks})
    _check_blocks(kernel, blocks.get("BM"), blocks["BN"], blocks["BK"], blocks.get("SPLIT_K"))
    if not _INTERPRETER:
        blocks["num_warps"] = config.num_warps or 4
        blocks["num_stages"] = config.num_stages or 3
    return blocks


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
"""Split-K arrival counters per (device, stream): all zero between launches, since each tile's last split
resets its own. One buffer per stream keeps launches on different streams from sharing counters."""


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[(device, stream)] = counters
    return counters


def _launch_gemv(x2d, qweight, qzeros, scales, G, N, config, dt):
    M, K = x2d.shape
    y = _new_output((M, N), x2d.dtype, x2d.device)
    m_bucket = triton.next_power_of_2(M)
    # Enough counters for the finest tiling any config uses (16 x 16 output tiles).
    counters = _split_counters(x2d.device, triton.cdiv(M, 16) * triton.cdiv(N, 16))
    if config.explicit or _INTERPRETER:
        blocks = _explicit_blocks("gemv", M, N, K, config)
        partials = _new_output((blocks["SPLIT_K"], M, N), torch.float32, x2d.device)
        grid = (triton.cdiv(N, blocks["BN"]), blocks["SPLIT_K"], triton.cdiv(M, blocks["BM"]))
        awq_gemv_splitk_kernel.fn[grid](x2d, qweight, qzeros, scales, y, partials, counters, M, N, K, G, N // 8,
                                        m_bucket, DT=dt, **blocks)
    else:
        # The tuner picks SPLIT_K per shape, so the partials buffer is sized for the largest candidate.
        max_split = max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS)
        partials = _new_output((max_split, M, N), torch.float32, x2d.device)
        BM = _gemv_block_m(M)

        def grid(meta):
            return (triton.cdiv(N, meta["BN"]), meta["SPLIT_K"], triton.cdiv(M, BM))

        awq_gemv_splitk_kernel[grid](x2d, qweight, qzeros, scales, y, partials, counters, M, N, K, G, N // 8,
                                     m_bucket, BM=BM, DT=dt)
    return y


def _launch_gemm(x2d, qweight, qzeros, scales, G, N, config, dt):
    M, K = x2d.shape
    y = _new_output((M, N), x2d.dtype, x2d.device)
    m_bucket = triton.next_power_of_2(M)
    if config.explicit or _INTERPRETER:
        blocks = _explicit_blocks("gemm", M, N, K, config)
        grid = (triton.cdiv(M, blocks["BM"]) * triton.cdiv(N, blocks["BN"]),)
        awq_gemm_tiled_kernel.fn[grid](x2d, qweight, qzeros, scales, y, M, N, K, G, N // 8, m_bucket, GROUP_M=8,
                                       DT=dt, **blocks)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

        awq_gemm_tiled_kernel[grid](x2d, qweight, qzeros, scales, y, M, N, K, G, N // 8, m_bucket, GROUP_M=8,
                                    DT=dt)
    return y


def _launch_dequant(x2d, qweight, qzeros, scales, G, N, config):
    K = x2d.shape[1]
    w = _new_output((K, N), x2d.dtype, x2d.device)
    if config.explicit or _INTERPRETER:
        blocks = _explicit_blocks("dequant", x2d.shape[0], N, K, config)
        grid = (triton.cdiv(K, blocks["BK"]), triton.cdiv(N, blocks["BN"]))
        awq_dequant_kernel.fn[grid](qweight, qzeros, scales, w, N, K, G, N // 8, **blocks)
    else:
        def grid(meta):
            return (triton.cdiv(K, meta["BK"]), triton.cdiv(N, meta["BN"]))

        awq_dequant_kernel[grid](qweight, qzeros, scales, w, N, K, G, N // 8)
    return x2d @ w


def _validate(x2d, qweight, qzeros, scales, group_size, config) -> tuple[int, int, int]:
    """Check the AWQ GEMM contract; returns ``(M, K, N)``."""
    if not isinstance(config, AwqGemmConfig):
        raise ValueError(f"config must be an AwqGemmConfig or None, got {type(config).__name__}; "
                         "pass AwqGemmConfig(kernel=..., block_n=...).")
    if config.kernel not in KERNELS:
        raise ValueError(f"config.kernel must be one of {KERNELS}, got {config.kernel!r}; use 'auto' to pick by M.")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [M, K], got shape {tuple(x2d.shape)}; flatten leading dims with "
                         "x.reshape(-1, x.shape[-1]).")
    if x2d.dtype not in _SUPPORTED_X_DTYPES:
        raise ValueError(f"x2d dtype must be float16, bfloat16 or float32, got {x2d.dtype}; cast it with .to().")
    if not x2d.is_contiguous():
        raise ValueError(f"x2d must be contiguous, got strides {x2d.stride()} for shape {tuple(x2d.shape)}; "
                         "call x2d.contiguous().")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor (AWQ GEMM packing), got {t.dtype} with shape "
                             f"{tuple(t.shape)}; pack codes with hf_plugins.kernels.awq_gemm.reference.pack_awq.")
    if not scales.is_floating_point() or scales.dim() != 2:
        raise ValueError(f"scales must be a 2-D float tensor [groups, N], got {scales.dtype} with shape "
                         f"{tuple(scales.shape)}; load the checkpoint's fp16 scales unchanged.")
    M, K = x2d.shape
    if qweight.shape[0] != K:
        raise ValueError(f"qweight must be [K, N // 8] with K = x2d.shape[1] = {K}, got shape "
                         f"{tuple(qweight.shape)}; the packed layout is [in_features, out_features // 8].")
    N = scales.shape[1]
    if N % 8:
        raise ValueError(f"N (out_features = scales.shape[1]) must be divisible by 8 for int4 packing, got {N}; "
                         "pad the output channels to a multiple of 8.")
    if qweight.shape[1] * 8 != N or qzeros.shape[1] * 8 != N:
        raise ValueError(f"qweight and qzeros must have N // 8 = {N // 8} columns (N = scales.shape[1] = {N}), got "
                         f"{qweight.shape[1]} and {qzeros.shape[1]}; pass the three tensors of one layer.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (32, 64, 128, or K = {K} for per-channel), got "
                         f"{group_size!r}; pass in_features for per-channel (group_size=-1) checkpoints.")
    groups = triton.cdiv(K, group_size)
    if qzeros.shape[0] != groups or scales.shape[0] != groups:
        raise ValueError(f"qzeros and scales need ceil(K / group_size) = ceil({K} / {group_size}) = {groups} rows, "
                         f"got {qzeros.shape[0]} and {scales.shape[0]}; check group_size against the checkpoint.")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}; call .contiguous() once at "
                             "load time.")
        if t.device != x2d.device:
            raise ValueError(f"{name} is on {t.device} but x2d is on {x2d.device}; move the layer with .to().")
    if x2d.device.type != "cuda" and not _INTERPRETER:
        raise ValueError(f"awq_gemm_triton needs CUDA tensors, got {x2d.device}; use the cpu or reference backend, "
                         "or set TRITON_INTERPRET=1 before importing this module to run the kernels interpreted.")
    return M, K, N


def awq_gemm_triton(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    config: AwqGemmConfig | None = None,
) -> torch.Tensor:
    """AWQ W4A16 matmul ``y = x2d @ dequant(W)`` with fp32 accumulation.

    Args:
        x2d (torch.Tensor): activations ``[M, K]``, contiguous, float16 / bfloat16 / float32.
        qweight (torch.Tensor): int32 ``[K, N // 8]``, AWQ nibble order (see ``reference.py``).
        qzeros (torch.Tensor): int32 ``[ceil(K / group_size), N // 8]``, same packing.
        scales (torch.Tensor): float ``[ceil(K / group_size), N]`` (fp16 in checkpoints; any float dtype).
        group_size (int): input channels per quantization group; ``K`` for per-channel checkpoints.
        config (AwqGemmConfig, Optional): forces a route and/or tiling. Default: ``None`` (dispatch by M,
            autotuned tiling on GPUs).

    Returns:
        torch.Tensor: ``[M, N]`` in ``x2d.dtype``.

    float32 activations run an exact (non-tf32) dot: use fp16/bf16 activations for speed.

    >>> y = awq_gemm_triton(x.reshape(-1, K), layer.qweight, layer.qzeros, layer.scales, 128)
    """
    config = config or AwqGemmConfig()
    M, K, N = _validate(x2d, qweight, qzeros, scales, group_size, config)
    if M == 0 or N == 0:
        return x2d.new_zeros((M, N))
    kernel = dispatch(M, config.kernel)
    if kernel == "gemv":
        return _launch_gemv(x2d, qweight, qzeros, scales, group_size, N, config, dot_dtype(x2d.dtype))
    if kernel == "gemm":
        return _launch_gemm(x2d, qweight, qzeros, scales, group_size, N, config, dot_dtype(x2d.dtype))
    return _launch_dequant(x2d, qweight, qzeros, scales, group_size, N, config)
