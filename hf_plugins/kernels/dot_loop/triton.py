"""The dot-loop probe in Triton: one tile pair per program, loaded once, multiplied ``iters`` times in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACCUMULATOR = {torch.int8: torch.int32}


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def dot_loop_kernel(a_ptr, b_ptr, out_ptr, iters, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    ACC: tl.constexpr):
    program = tl.program_id(0)
    rows, cols, depth = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + program * BM * BK + rows[:, None] * BK + depth[None, :])
    b = tl.load(b_ptr + program * BK * BN + depth[:, None] * BN + cols[None, :])
    acc = tl.zeros((BM, BN), dtype=ACC)
    for _ in range(iters):
        acc += tl.dot(a, b, out_dtype=ACC)
    tl.store(out_ptr + program * BM * BN + rows[:, None] * BN + cols[None, :], acc)


def dot_loop_triton(a: torch.Tensor, b: torch.Tensor, iters: int, num_warps: int = 4) -> torch.Tensor:
    """``a [programs, bm, bk]``, ``b [programs, bk, bn]`` (one float dtype, or int8) -> ``iters * a @ b``
    ``[programs, bm, bn]`` in fp32 (int32 for int8). Tile sides are powers of two >= 16 (``tl.dot``'s minimum);
    fp32 inputs multiply in TF32 on tensor cores."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"a must be [programs, bm, bk] and b [programs, bk, bn], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}.")
    programs, bm, bk = a.shape
    bn = b.shape[2]
    if any(side < 16 or side & (side - 1) for side in (bm, bn, bk)):
        raise ValueError(f"tile sides must be powers of two >= 16, got bm={bm}, bn={bn}, bk={bk}.")
    accumulator = _ACCUMULATOR.get(a.dtype, torch.float32)
    out = _new_output((programs, bm, bn), accumulator, a.device)
    acc = tl.int32 if accumulator == torch.int32 else tl.float32
    dot_loop_kernel[(programs,)](a.contiguous(), b.contiguous(), out, iters, BM=bm, BN=bn, BK=bk, ACC=acc,
                                 num_warps=num_warps)
    return out
