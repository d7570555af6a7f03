"""Dense linear through oneDNN on CPU.

``torch.ops.mkldnn._linear_pointwise`` (the op Inductor emits for CPU linears) runs oneDNN's matmul on the plain
``[out, in]`` weight. On the AVX-512 development machine at 1 thread, for a 1536 -> 8960 fp32 layer it takes
1.6 ms for one row where ``F.linear`` (MKL) takes 2.6 ms, and 3.3 ms for six rows where ``F.linear`` takes 5.8 ms:
MKL's GEMM repacks the whole weight on every call, which dominates the few-row products of decoding and of
speculative verification. No extra copy of the weight is kept.

oneDNN's bf16 inner product needs AVX-512 (native AVX512-BF16/AMX or AVX-512 emulation): on an AVX2-only CPU it
has no primitive for bf16 and raises, so each dtype is checked once, at first use, before it is routed here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and the pointwise linear op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_onednn_bf16() -> bool:
    """torch's own query: whether oneDNN runs bf16 on this CPU (False on AVX2-only machines)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=None)
def onednn_linear_supports(dtype: torch.dtype) -> bool:
    """Whether the oneDNN linear runs ``dtype`` on this machine; decided once per dtype and cached.

    Beyond the capability queries, one tiny product is run and compared with ``F.linear``, so a build or ISA that
    the queries misjudge takes the plain route instead of failing (or being wrong) inside a model.
    """
    if dtype not in SUPPORTED_DTYPES or not onednn_linear_available():
        return False
    if dtype == torch.bfloat16 and not cpu_has_onednn_bf16():
        return False
    x = torch.linspace(-1, 1, 2 * 16).reshape(2, 16).to(dtype)
    weight = torch.linspace(1, -1, 3 * 16).reshape(3, 16).to(dtype)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    except RuntimeError:
        return False
    return bool(torch.allclose(y.float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2))


def dense_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ weight[out, in]^T + bias`` with oneDNN; inputs on CPU in a dtype
    :func:`onednn_linear_supports` accepts on this machine."""
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"dense_linear_cpu takes x and weight of one dtype in {SUPPORTED_DTYPES}, got {x.dtype} and "
            f"{weight.dtype}; use dense_linear(), which routes other dtypes to F.linear."
        )
    if not onednn_linear_supports(x.dtype):
        raise TypeError(
            f"oneDNN has no {x.dtype} linear on this CPU ({torch.backends.cpu.get_cpu_capability()}; bf16 needs "
            "AVX-512); use dense_linear(), which routes this dtype to F.linear here."
        )
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    y = torch.ops.mkldnn._linear_pointwise.default(x2d, weight.contiguous(), bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])
