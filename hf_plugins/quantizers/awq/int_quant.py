"""Group-wise asymmetric integer quantization (round-to-nearest with an integer zero point).

Shapes follow ``nn.Linear``: weights are ``[out_features, in_features]`` and groups run along ``in_features``.
``group_size=-1`` means one group per output channel (per-channel quantization). When ``group_size`` does not
divide ``in_features`` (SmolLM2's hidden size 576 with groups of 128), the last group is partial: there are
``ceil(in / g)`` groups and the last one covers the remaining ``in % g`` channels.
"""

from __future__ import annotations

import torch


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along ``in_features`` (the last one may be partial)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_columns(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, g]``, zero-padding a partial last group.

    Zero padding leaves each group's min/max unchanged because the range is always widened to include 0, and adds
    nothing to any dot product.
    """
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    groups = num_groups(in_features, group_size)
    padding = groups * group - in_features
    padded = torch.nn.functional.pad(weight, (0, padding)) if padding else weight
    return padded.reshape(out_features, groups, group)


def _ungrouped(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def compute_scales_zeros(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and integer zeros, both ``[out, ceil(in / g)]``.

    Scales are rounded to values exact in both ``scale_dtype`` (the checkpoint's fp16) and bf16: the fast CPU
    int4 kernel holds scales in bf16, so such scales keep it exact at no cost. The step moves by at most 2^-9
    relative, and the codes are chosen for the rounded step, so nothing else changes.
    """
    return _grouped_scales_zeros(group_columns(weight.float(), group_size), bits, scale_dtype)


def _grouped_scales_zeros(
    grouped: torch.Tensor, bits: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_scales_zeros` of already grouped fp32 weights ``[out, groups, g]``."""
    w_max = grouped.amax(-1).clamp_min(0.0)
    w_min = grouped.amin(-1).clamp_max(0.0)
    q_max = 2**bits - 1
    step = ((w_max - w_min).clamp_min(1e-5) / q_max).to(scale_dtype)
    # Through scale_dtype first: an fp16 subnormal rounded to bf16 stays exact in fp16 (<= 10 significant bits).
    scales = step.to(torch.bfloat16).to(scale_dtype).float()
    zeros = torch.clamp(-torch.round(w_min / scales), 0, q_max).to(torch.int32)
    return scales, zeros


def quantize_groupwise(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight [out, in]``.

    Returns ``codes`` int32 ``[out, in]`` in ``[0, 2^bits - 1]``, ``scales`` float32 ``[out, ceil(in / g)]`` (values
    exactly representable in ``scale_dtype``) and ``zeros`` int32 ``[out, ceil(in / g)]``.
    """
    scales, zeros = compute_scales_zeros(weight, bits, group_size, scale_dtype)
    grouped = group_columns(weight.float(), group_size)
    codes = torch.clamp(torch.round(grouped / scales[..., None]) + zeros[..., None], 0, 2**bits - 1)
    return _ungrouped(codes.to(torch.int32), weight.shape[1]), scales, zeros


def dequantize_groupwise(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` up to rounding: float32 ``[out, in]``."""
    grouped = group_columns(codes.float(), group_size)
    return _ungrouped((grouped - zeros[..., None].float()) * scales[..., None], codes.shape[1])


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Quantize then dequantize ``weight [out, in]``; returns the same dtype as ``weight``.

    Bit-identical to ``dequantize_groupwise(*quantize_groupwise(...))`` (the codes are small integers, exact in
    fp32), in six in-place passes instead of fifteen: the AWQ searches call it for every candidate.
    """
    grouped = group_columns(weight.float(), group_size)
    scales, zeros = _grouped_scales_zeros(grouped, bits, scale_dtype)
    scale, zero = scales[..., None], zeros[..., None].float()
    codes = torch.div(grouped, scale).round_().add_(zero).clamp_(0, 2**bits - 1)
    return _ungrouped(codes.sub_(zero).mul_(scale), weight.shape[1]).to(weight.dtype)
