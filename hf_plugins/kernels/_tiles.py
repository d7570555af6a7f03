"""Triton helpers shared by the GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """``(i_m, i_n)``, the output tile of program ``program_id(0)`` of a 1-D grid over ``cdiv(M, BM) x cdiv(N, BN)``
    tiles, ordered so programs sharing a weight column block run back to back (GROUP_M row blocks at a time) and
    find its weights in L2."""
    i_p = tl.program_id(0)
    NM, NN = tl.cdiv(M, BM), tl.cdiv(N, BN)
    i_first = (i_p // (GROUP_M * NN)) * GROUP_M
    size_m = tl.minimum(NM - i_first, GROUP_M)
    i_m = i_first + (i_p % (GROUP_M * NN)) % size_m
    i_n = (i_p % (GROUP_M * NN)) // size_m
    return i_m, i_n
