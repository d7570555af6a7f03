"""Kernel launchers allocate outputs through a module-level ``_new_output``; tests replace it with this so every
element a kernel forgets to write shows up (NaN for floats, -99 for integers)."""

import torch


def poisoned_output(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -99 if dtype.is_signed else 99, dtype=dtype, device=device)
