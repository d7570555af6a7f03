"""Triton helpers shared by the GEMM kernels."""

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype both float dot operands take for activations of ``dtype``: their own, except bf16 under the
    interpreter (whose bf16 arithmetic runs on raw bits), which takes the exact fp32 route, as fp32 does."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not triton_interpreter():
        return tl.bfloat16
    return tl.float32


@triton.jit
def grouped_tile_of(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """``(i_m, i_n)``, output tile number ``tile`` of ``cdiv(M, BM) x cdiv(N, BN)`` tiles, ordered so consecutive
    tiles share a weight column block (GROUP_M row blocks at a time) and find its weights in L2."""
    NM, NN = tl.cdiv(M, BM), tl.cdiv(N, BN)
    i_first = (tile // (GROUP_M * NN)) * GROUP_M
    size_m = tl.minimum(NM - i_first, GROUP_M)
    i_m = i_first + (tile % (GROUP_M * NN)) % size_m
    i_n = (tile % (GROUP_M * NN)) // size_m
    return i_m, i_n


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """The tile (:func:`grouped_tile_of`) of program ``program_id(0)`` of a 1-D grid with one program per tile."""
    return grouped_tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
