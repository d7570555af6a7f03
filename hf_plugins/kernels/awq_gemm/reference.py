"""Pure-torch reference for the AWQ "GEMM" int4 layout: the test oracle for every fast path.

Layout (AutoAWQ ``WQLinear_GEMM`` / llm-awq v1, the format of AWQ checkpoints on model hubs):

- ``qweight``: int32 ``[in_features, out_features // 8]``; each word holds 8 output channels, nibble ``j``
  (bits ``4j .. 4j+3``) holding channel ``AWQ_ORDER[j]`` of its group of 8.
- ``qzeros``: int32 ``[groups, out_features // 8]``, same interleave, integer zero points.
- ``scales``: float (fp16 in checkpoints) ``[groups, out_features]``.
- ``groups = ceil(in_features / group_size)``: when the group size does not divide ``in_features`` the last group
  is partial (an extension of the format; standard checkpoints always have full groups).
- dequantized weight ``W[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]``, so
  ``y = x @ W`` with ``W`` laid out ``[in, out]``.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``j`` of a packed word holds output channel ``AWQ_ORDER[j]`` of its group of 8."""

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Output channel ``c`` of a group of 8 sits in nibble ``AWQ_REVERSE_ORDER[c]``."""

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[rows, cols]`` (values 0..15, cols % 8 == 0) into int32 ``[rows, cols // 8]``."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"pack_awq needs a column count divisible by 8, got {cols}; pad the output channels.")
    if codes.min() < 0 or codes.max() > 15:
        raise ValueError(f"pack_awq needs codes in [0, 15], got [{codes.min().item()}, {codes.max().item()}].")
    grouped = codes.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    words = (grouped << _SHIFTS.to(grouped.device, torch.int64)).sum(-1)
    # Values above 2^31 wrap to negative int32, as the checkpoint format stores them.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[rows, cols // 8]`` -> int32 codes ``[rows, cols]``."""
    rows, words = packed.shape
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(packed.device, torch.int64)) & 0xF
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(rows, words * 8).to(torch.int32)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dequantize to ``[in_features, out_features]`` in float32."""
    codes = unpack_awq(qweight).to(torch.float32)
    in_features = codes.shape[0]
    zeros = unpack_awq(qzeros).to(torch.float32).repeat_interleave(group_size, dim=0)[:in_features]
    return (codes - zeros) * scales.to(torch.float32).repeat_interleave(group_size, dim=0)[:in_features]


def awq_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] @ dequant(W) [in, out] (+ bias)`` computed in float64, returned in ``x.dtype``."""
    weight = awq_dequantize(qweight, qzeros, scales, group_size).double()
    y = x.double() @ weight
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
