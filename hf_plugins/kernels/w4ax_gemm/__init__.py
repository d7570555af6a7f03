"""W4Ax: 4-bit weights times run-time mixed 4-/8-bit activations (COMET's FMPQ layout), with backend dispatch.

Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`w4ax_linear_reference`, integer partial sums in int64, the test oracle.
- ``cpu``: :func:`~.cpu.w4ax_linear_cpu` on a :class:`~.cpu.CpuW4AxWeight` (:func:`prepack_cpu`, once per layer).
- ``triton``: :func:`~.triton.w4ax_linear_triton`, a fused activation pass and an INT8-MMA GEMM, imported on
  first use.
"""

import torch

from .._dispatch import choose_backend
from .cpu import CpuW4AxWeight, prepack_cpu, w4ax_linear_cpu
from .reference import (
    ALLOWED_GROUP_SIZES,
    BLOCK,
    check_layout,
    pack_int4,
    quantize_activations,
    quantize_weight,
    unpack_int4,
    w4ax_linear_reference,
    w4ax_matmul_reference,
)

__all__ = [
    "ALLOWED_GROUP_SIZES",
    "BLOCK",
    "CpuW4AxWeight",
    "check_layout",
    "pack_int4",
    "prepack_cpu",
    "quantize_activations",
    "quantize_weight",
    "unpack_int4",
    "w4ax_linear",
    "w4ax_linear_cpu",
    "w4ax_linear_reference",
    "w4ax_matmul_reference",
]


def w4ax_linear(
    x: torch.Tensor,
    perm: torch.Tensor,
    a8_channels: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``: the W4Ax linear on the chosen backend.

    Args:
        x: activations in the original channel order.
        perm: int64 ``[K]``, the original channel at each reordered position.
        a8_channels: reordered channels (whole 128-blocks, first) quantized to 8 bits; the rest get 4.
        qweight: uint8 ``[N, ceil(K/2)]``, :func:`pack_int4` of the weight codes in the reordered order.
        scales: float32 ``[N, groups]``.
        group_size: 64, 128 or -1.
        bias: ``[N]`` or None.
        backend: ``reference``, ``cpu``, ``triton`` or None (the device decides).

    Modules keep each backend's weight form instead of converting per call (see ``W4AxLinear``).
    """
    check_layout(x.shape[-1], a8_channels, group_size)
    chosen = choose_backend("w4ax_gemm", x.device, backend)
    if chosen == "reference":
        codes = unpack_int4(qweight, x.shape[-1])
        return w4ax_linear_reference(x, perm, a8_channels, codes, scales, group_size, bias)
    if chosen == "cpu":
        return w4ax_linear_cpu(x, perm, a8_channels, prepack_cpu(qweight, scales, x.shape[-1], group_size), bias)
    from .triton import w4ax_linear_triton

    return w4ax_linear_triton(x, perm, a8_channels, qweight.t().contiguous(), scales.t().contiguous(), group_size,
                              bias)
