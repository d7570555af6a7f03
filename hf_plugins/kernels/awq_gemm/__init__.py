"""AWQ int4 GEMM: ``y = x @ dequant(W) (+ bias)`` for the AWQ "GEMM" checkpoint layout, with backend dispatch.

Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`awq_gemm_reference`, float64 pure torch, the test oracle.
- ``cpu``: :func:`awq_gemm_cpu` on a :class:`CpuAwqWeight` built by :func:`prepack`. A quantized module should
  prepack once at load time, keep only the prepacked form, and regenerate the AWQ tensors with :func:`unprepack`
  for ``state_dict`` (bit-identical). :func:`awq_gemm` prepacks on every call, which is fine for one-off calls only.
- ``triton``: ``awq_gemm_triton`` from :mod:`.triton`, imported on first use.
"""

from __future__ import annotations

import torch

from .._dispatch import choose_backend
from .cpu import CpuAwqWeight, awq_gemm_cpu, prepack, prepack_codes, unprepack, unprepack_codes
from .reference import awq_dequantize, awq_gemm_reference, pack_awq, unpack_awq

__all__ = [
    "CpuAwqWeight",
    "awq_dequantize",
    "awq_gemm",
    "awq_gemm_cpu",
    "awq_gemm_reference",
    "effective_group_size",
    "pack_awq",
    "prepack",
    "prepack_codes",
    "unpack_awq",
    "unprepack",
    "unprepack_codes",
]


def effective_group_size(group_size: int, in_features: int) -> int:
    """The group length along ``in_features`` the kernels use: ``in_features`` for per-channel ``-1``."""
    return in_features if group_size == -1 else group_size


def _awq_gemm_triton(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int
) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` through the Triton kernel, which takes a contiguous 2-D ``[M, in]``."""
    from .triton import awq_gemm_triton

    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = awq_gemm_triton(x2d, qweight, qzeros, scales, group)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """AWQ W4 matmul ``x @ dequant(W) + bias``.

    Args:
        x: activations ``[batch, seq, in_features]`` (any leading dims), float32 / bfloat16 / float16.
        qweight: int32 ``[in_features, out_features // 8]``, AWQ nibble order.
        qzeros: int32 ``[groups, out_features // 8]`` with ``groups = ceil(in_features / group_size)``.
        scales: float ``[groups, out_features]``.
        group_size: inputs per group; ``-1`` for per-channel (one group).
        bias: optional ``[out_features]``.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``None`` (``HF_PLUGINS_BACKEND``, then by device).

    Returns ``[batch, seq, out_features]`` in ``x.dtype``. The cpu backend's int4pack kernel computes with bf16
    activations (see :mod:`.cpu`), so its results carry bf16 rounding. It also prepacks the weight on every call
    (~35 ms for a 1536 x 8960 layer): modules should :func:`prepack` once and call :func:`awq_gemm_cpu`.
    """
    group = effective_group_size(group_size, qweight.shape[0])
    chosen = choose_backend("awq_gemm", x.device, backend)
    if chosen == "cpu":
        return awq_gemm_cpu(x, prepack(qweight, qzeros, scales, group), bias)
    if chosen == "reference":
        return awq_gemm_reference(x, qweight, qzeros, scales, group, bias)
    y = _awq_gemm_triton(x, qweight, qzeros, scales, group)
    return y if bias is None else y + bias.to(y.dtype)
