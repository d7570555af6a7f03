"""The dot-loop probe's result in plain torch: every program's tile product, summed ``iters`` times."""

from __future__ import annotations

import torch


def dot_loop_reference(a: torch.Tensor, b: torch.Tensor, iters: int) -> torch.Tensor:
    """``a [programs, bm, bk]``, ``b [programs, bk, bn]`` -> ``[programs, bm, bn]`` = ``iters * a @ b``, computed in
    float64: int32 (exact) for int8 inputs, float32 otherwise."""
    product = torch.bmm(a.double(), b.double()) * iters
    return product.to(torch.int32 if a.dtype == torch.int8 else torch.float32)
