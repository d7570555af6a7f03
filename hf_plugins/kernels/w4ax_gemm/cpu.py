"""W4Ax on CPU: activations quantized per token and block in torch, then the product on the faster CPU route.

Routes (:func:`cpu_route`), measured on 1 thread (``benchmarks/w4ax_cpu.py``):

- ``int8``: one exact int8 GEMM (``torch._int_mm``, oneDNN's s8 x s8 -> s32) per scale step of 128 (or 64)
  channels, each step's int32 partial scaled by its weight-group and token-block scales and summed in fp32.
  Weight codes are kept unpacked as int8 ``[K, N]`` (a quarter of fp32's bytes). On CPUs with VNNI / AMX
  (AVX512 builds) the integer products run 2-4x faster than fp32 ``F.linear``, but the per-step scaling
  (``M x N`` work per 128 input channels) gives much of it back.
- ``fp32``: the same numbers as one fp32 GEMM: dequantized activations (codes times their block scales) times
  the dequantized weight, cached in fp32. Without VNNI (AVX2 builds) ``torch._int_mm`` is 3-16x slower than
  fp32, so this is the faster route there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .reference import (
    BLOCK,
    dequantize_activations,
    dequantize_weight,
    quantize_activations,
    step_size,
    unpack_int4,
)

CPU_ROUTES = ("int8", "fp32")


@functools.lru_cache(maxsize=None)
def cpu_route() -> str:
    """``int8`` on AVX512 builds (VNNI / AMX integer dot products), ``fp32`` elsewhere."""
    return "int8" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "fp32"


@dataclass(frozen=True)
class CpuW4AxWeight:
    """A layer's weight in the CPU kernel's form (reordered channel order): int8 codes ``[K, N]`` and float32
    scales ``[groups, N]`` for the ``int8`` route, or the dequantized float32 weight ``[N, K]`` for ``fp32``."""

    route: str
    weight: torch.Tensor
    scales: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int


def prepack_cpu(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                route: str | None = None) -> CpuW4AxWeight:
    """``qweight`` uint8 ``[N, ceil(K/2)]`` and ``scales [N, groups]`` -> :class:`CpuW4AxWeight` for ``route``
    (default: :func:`cpu_route`)."""
    route = route or cpu_route()
    if route not in CPU_ROUTES:
        raise ValueError(f"route must be one of {CPU_ROUTES}, got {route!r}.")
    codes = unpack_int4(qweight, in_features)
    out_features = codes.shape[0]
    if route == "int8":
        return CpuW4AxWeight(route, codes.t().contiguous(), scales.float().t().contiguous(), group_size,
                             in_features, out_features)
    dequantized = dequantize_weight(codes, scales.float(), group_size).contiguous()
    return CpuW4AxWeight(route, dequantized, None, group_size, in_features, out_features)


def w4ax_matmul_cpu(x_codes: torch.Tensor, x_scales: torch.Tensor, weight: CpuW4AxWeight) -> torch.Tensor:
    """``sum_steps x_scales[:, block] * w_scales[group] * (x_codes_step @ w_codes_step)`` -> float32 ``[M, N]``."""
    in_features = weight.in_features
    if weight.route == "fp32":
        return dequantize_activations(x_codes, x_scales) @ weight.weight.t()
    step = step_size(weight.group_size)
    group = in_features if weight.group_size == -1 else weight.group_size
    out = torch.zeros(x_codes.shape[0], weight.out_features)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        partial = torch._int_mm(x_codes[:, start:stop], weight.weight[start:stop]).float()
        out.addcmul_(partial.mul_(weight.scales[start // group]), x_scales[:, start // BLOCK, None])
    return out


def w4ax_linear_cpu(x: torch.Tensor, perm: torch.Tensor, a8_channels: int, weight: CpuW4AxWeight,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` (original channel order) -> ``[..., N]`` in ``x.dtype``."""
    if x.device.type != "cpu":
        raise ValueError(f"w4ax_linear_cpu needs a CPU tensor, got one on {x.device}; call .cpu() or use "
                         "w4ax_linear().")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight expects {weight.in_features}; check "
                         "which layer this input belongs to.")
    x_codes, x_scales = quantize_activations(x.reshape(-1, weight.in_features)[:, perm], a8_channels)
    out = w4ax_matmul_cpu(x_codes, x_scales, weight)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
