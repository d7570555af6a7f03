"""This machine's own limits, the roofline every kernel figure is a fraction of (``hf-plugins bench hw``).

Measured, not looked up: dense matmul throughput per dtype (on CPU through the ops torch offers: fp32/bf16
``torch.mm`` and int8 ``torch._int_mm``; on CUDA through cuBLAS and a Triton ``tl.dot`` loop), memory bandwidth
(STREAM copy and triad over arrays at least 4x the last-level cache; on GPUs also an L2-resident copy), and the
host-side cost of one op call (a bare ``nn.Linear``, our backend dispatcher, our ``FastLinear``) on tensors small
enough that the call is all there is. A kernel that moves ``B`` bytes and does ``F`` operations in ``t`` seconds
reaches ``max(B / bandwidth, F / peak) / t`` of the roofline (:meth:`Roofline.fraction`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .kernels._dispatch import choose_backend
from .kernels._routes import cpu_model
from .kernels.dense_linear import FastLinear

PAPER_HOPPER = {
    "source": "Luo et al., Benchmarking and Dissecting the Nvidia Hopper GPU Architecture (H800 PCIe; H100 SXM "
              "reproduction)",
    "H800 PCIe": {"fp16 TFLOPS (wgmma)": 728.5, "fp8 TFLOPS (wgmma)": 1448, "int8 TOPS (wgmma)": 1448,
                  "HBM GB/s": 1407},
    "H100 SXM": {"fp16 TFLOPS (wgmma)": 976.6, "fp8 TFLOPS (wgmma)": 1951, "int8 TOPS (wgmma)": 1951,
                 "HBM GB/s": 3010},
}
"""The headline quantities of the Hopper dissection paper, printed beside our own measurement on a Hopper card."""


@dataclass
class Roofline:
    """Measured limits of one device. Throughputs in TFLOPS (TOPS for int8), bandwidths in GB/s, call costs in
    microseconds."""

    device: str
    threads: int
    matmul_tflops: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{dtype: {route: TFLOPS}}``, e.g. ``{"fp32": {"torch.mm": 0.09}}``."""
    bandwidth_gbs: dict[str, float] = field(default_factory=dict)
    """``{"copy": ..., "triad": ...}`` (and ``"l2_copy"`` on GPUs)."""
    call_us: dict[str, float] = field(default_factory=dict)
    """Host-side cost of one call: ``{"nn.Linear": ..., "dispatcher": ..., "FastLinear": ...}``."""
    reference: dict = field(default_factory=dict)
    """Published figures for this device class (the Hopper paper's on H100/H800), when known."""

    def peak_tflops(self, dtype: str) -> float:
        """The best measured throughput for ``dtype`` over all routes."""
        if dtype not in self.matmul_tflops:
            raise ValueError(f"no matmul throughput measured for dtype {dtype!r}; measured: {sorted(self.matmul_tflops)}")
        return max(self.matmul_tflops[dtype].values())

    def fraction(self, seconds: float, bytes_moved: float = 0.0, flops: float = 0.0, dtype: str = "fp32") -> float:
        """Fraction of the roofline a kernel reached: the time the limits allow for its bytes (at the measured
        triad bandwidth) and operations (at the dtype's peak), whichever is longer, over ``seconds``."""
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}.")
        memory_s = bytes_moved / (self.bandwidth_gbs["triad"] * 1e9) if bytes_moved else 0.0
        compute_s = flops / (self.peak_tflops(dtype) * 1e12) if flops else 0.0
        return max(memory_s, compute_s) / seconds

    def as_dict(self) -> dict:
        return asdict(self)


def best_seconds(fn: Callable[[], object], min_time_s: float = 0.2, min_runs: int = 3,
                 sync: Callable[[], None] = lambda: None) -> float:
    """Least wall time of ``fn()`` after two warm-up calls, over at least ``min_runs`` runs and ``min_time_s``: a
    limit is what the machine can do, so the least disturbed run counts."""
    for _ in range(2):
        fn()
    sync()
    samples, start = [], time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_time_s:
        begin = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - begin)
    return min(samples)


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache of cpu0 in bytes, from Linux sysfs; ``default`` where it cannot be read."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(root) if os.path.isdir(root) else ():
        try:
            with open(os.path.join(root, index, "size")) as size:
                text = size.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=default)


def cpu_name() -> str:
    """CPU model and ATen's CPU capability (the ISA its kernels use), e.g. ``"AMD EPYC (AVX512)"``."""
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def _matmul_tflops(dtype: torch.dtype, n: int, device: str, sync: Callable[[], None], min_time_s: float) -> float:
    """``[n, n] @ [n, n]`` throughput in TFLOPS (TOPS for int8, through ``torch._int_mm``)."""
    if dtype == torch.int8:
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        seconds = best_seconds(lambda: torch._int_mm(a, b), min_time_s, sync=sync)
    else:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        seconds = best_seconds(lambda: torch.mm(a, b), min_time_s, sync=sync)
    return 2 * n**3 / seconds / 1e12


def _stream_gbs(n_floats: int, device: str, sync: Callable[[], None], min_time_s: float) -> dict[str, float]:
    """STREAM copy (``a = b``: 2 arrays of traffic) and triad (``a = b + 3 c``: 3 arrays) in GB/s."""
    a, b, c = (torch.ones(n_floats, device=device) for _ in range(3))
    nbytes = a.numel() * a.element_size()
    copy_s = best_seconds(lambda: a.copy_(b), min_time_s, sync=sync)
    triad_s = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), min_time_s, sync=sync)
    return {"copy": 2 * nbytes / copy_s / 1e9, "triad": 3 * nbytes / triad_s / 1e9}


def _call_us(device: str, sync: Callable[[], None]) -> dict[str, float]:
    """Microseconds per call of a 1x1 ``nn.Linear``, our backend dispatcher alone, and a 1x1 ``FastLinear``."""
    plain, fast = nn.Linear(1, 1).to(device), FastLinear(1, 1).to(device)
    x = torch.ones(1, 1, device=device)
    device_type = torch.device(device)
    with torch.inference_mode():
        return {
            "nn.Linear": best_seconds(lambda: plain(x), 0.1, sync=sync) * 1e6,
            "dispatcher": best_seconds(lambda: choose_backend("dense_linear", device_type), 0.1) * 1e6,
            "FastLinear": best_seconds(lambda: fast(x), 0.1, sync=sync) * 1e6,
        }


def measure_cpu(matmul_n: int = 1024, stream_floats: int | None = None, min_time_s: float = 0.2) -> Roofline:
    """This CPU's roofline at ``torch.get_num_threads()`` threads.

    Args:
        matmul_n: square matmul size (1024: about 2 GFLOP per fp32 call).
        stream_floats: fp32 elements per STREAM array; default 4x the last-level cache (at least 16 Mi).
        min_time_s: minimum timed seconds per figure.
    """
    floats = stream_floats or max(4 * last_level_cache_bytes() // 4, 16 << 20)
    result = Roofline(device=cpu_name(), threads=torch.get_num_threads())
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        result.matmul_tflops[name] = {"torch.mm" if dtype != torch.int8 else "torch._int_mm":
                                      _matmul_tflops(dtype, matmul_n, "cpu", lambda: None, min_time_s)}
    result.bandwidth_gbs = _stream_gbs(floats, "cpu", lambda: None, min_time_s)
    result.call_us = _call_us("cpu", lambda: None)
    return result


def _cublas_tflops(n: int, sync: Callable[[], None], min_time_s: float) -> dict[str, dict[str, float]]:
    """cuBLAS throughput per dtype at ``[n, n] @ [n, n]``: fp16, bf16, TF32, fp8 e4m3 (``torch._scaled_mm``, where
    the card has it) and int8 (``torch._int_mm``)."""
    result = {name: {"cuBLAS": _matmul_tflops(dtype, n, "cuda", sync, min_time_s)}
              for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("int8", torch.int8))}
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result["tf32"] = {"cuBLAS": _matmul_tflops(torch.float32, n, "cuda", sync, min_time_s)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if torch.cuda.get_device_capability() >= (8, 9):
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm takes column-major b
        one = torch.ones((), device="cuda")
        seconds = best_seconds(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), min_time_s,
                                 sync=sync)
        result["fp8"] = {"cuBLAS": 2 * n**3 / seconds / 1e12}
    return result


def _triton_dot_tflops(dtype: torch.dtype, sync: Callable[[], None], min_time_s: float) -> float:
    """Throughput of the Triton ``tl.dot`` loop (:mod:`hf_plugins.kernels.dot_loop`): 128x128x64 tiles, 8 programs
    per SM, checked against its reference before it is timed."""
    from .kernels.dot_loop import dot_loop_reference, dot_loop_triton

    programs = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    bm = bn = 128
    bk, iters = 64, 4096
    a = torch.randint(-2, 3, (programs, bm, bk), device="cuda").to(dtype)
    b = torch.randint(-2, 3, (programs, bk, bn), device="cuda").to(dtype)
    if not torch.equal(dot_loop_triton(a, b, 3).cpu(), dot_loop_reference(a.cpu(), b.cpu(), 3)):
        raise RuntimeError(f"the Triton dot-loop probe computed a wrong product for {dtype}; no figure is reported.")
    seconds = best_seconds(lambda: dot_loop_triton(a, b, iters, num_warps=8), min_time_s, sync=sync)
    return 2 * programs * bm * bn * bk * iters / seconds / 1e12


def measure_cuda(matmul_n: int = 8192, min_time_s: float = 0.3) -> Roofline:
    """The current CUDA device's roofline: cuBLAS and Triton ``tl.dot`` throughput per dtype, HBM bandwidth (STREAM
    over 1 GiB arrays), L2 bandwidth (a copy of arrays a quarter of the L2 each) and the host cost of one call."""
    sync = torch.cuda.synchronize
    properties = torch.cuda.get_device_properties(0)
    result = Roofline(device=properties.name, threads=1)
    result.matmul_tflops = _cublas_tflops(matmul_n, sync, min_time_s)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("tf32", torch.float32),
                        ("int8", torch.int8)):
        result.matmul_tflops[name]["Triton tl.dot"] = _triton_dot_tflops(dtype, sync, min_time_s)
    if "fp8" in result.matmul_tflops:
        result.matmul_tflops["fp8"]["Triton tl.dot"] = _triton_dot_tflops(torch.float8_e4m3fn, sync, min_time_s)
    result.bandwidth_gbs = _stream_gbs(1 << 28, "cuda", sync, min_time_s)
    l2_floats = max(properties.L2_cache_size // 16, 1 << 16)
    result.bandwidth_gbs["l2_copy"] = _stream_gbs(l2_floats, "cuda", sync, min_time_s)["copy"]
    result.call_us = _call_us("cuda", sync)
    result.reference = paper_figures(properties.name)
    return result


def paper_figures(device_name: str) -> dict:
    """The Hopper paper's figures for this card's class (H200 shares H100 SXM's compute), or ``{}``."""
    for key, card in (("H800", "H800 PCIe"), ("H100", "H100 SXM"), ("H200", "H100 SXM")):
        if key in device_name:
            return {"source": PAPER_HOPPER["source"], "card": card, **PAPER_HOPPER[card]}
    return {}


def measure(device: str = "cpu", **kwargs) -> Roofline:
    """:func:`measure_cpu` or :func:`measure_cuda`."""
    if device == "cpu":
        return measure_cpu(**kwargs)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' needs a CUDA GPU, and torch sees none; measure device='cpu' instead.")
        return measure_cuda(**kwargs)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
