"""Long causal convolution (FlashFFTConv, Fu et al. 2024): dense, partial (``kernel_len``) and frequency-sparse
(``keep_frequencies``), as in Hyena-style models. Definitions in :mod:`.reference`.

Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`~.reference.fft_conv_direct_reference` (the direct sum in float64) for dense calls,
  :func:`~.reference.fft_conv_spectral_reference` (float64 ``torch.fft``) for frequency-sparse ones.
- ``cpu``: :func:`~.cpu.fft_conv_cpu`, ``torch.fft`` at a fast exact size with a cached filter spectrum, or
  ``F.conv1d`` for short filters.
- ``triton``: ``fft_conv_triton`` from :mod:`.triton`, imported on first use.
"""

from __future__ import annotations

import torch

from .._dispatch import choose_backend
from .cpu import SPECTRUM_CACHE, KernelSpectrumCache, fft_conv_cpu
from .reference import check_gates, check_inputs, fft_conv_direct_reference, fft_conv_spectral_reference

__all__ = [
    "SPECTRUM_CACHE",
    "KernelSpectrumCache",
    "check_gates",
    "check_inputs",
    "fft_conv",
    "fft_conv_cpu",
    "fft_conv_direct_reference",
    "fft_conv_spectral_reference",
]


def fft_conv(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None, keep_frequencies: float | None = None,
             backend: str | None = None, pre_gate: torch.Tensor | None = None,
             post_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution of ``u`` with a long filter per channel, optionally gated.

    ``y[b, c, t] = post[b, c, t] * sum_{s <= min(t, L - 1)} k[c, s] * (pre * u)[b, c, t - s]`` with ``L =
    kernel_len`` (absent gates are 1; Hyena's ``x_0 * conv(x_1 * v)``); with ``keep_frequencies`` the filter keeps
    only the lowest ``ceil(f * bins)`` of its ``bins`` rfft bins at ``n_fft = 2 * next_power_of_two(seq)``
    (:mod:`.reference`).

    Args:
        u: ``[batch, channels, seq]`` float (fp32, bf16, fp16 or fp64).
        k: ``[channels, taps]`` float, on u's device; taps may be shorter or longer than seq (taps at or past
            seq never reach an output).
        kernel_len: use only the first ``kernel_len`` taps (partial convolution), in ``[1, taps]``; None: all.
        keep_frequencies: fraction in ``(0, 1]`` of the lowest filter frequencies kept; None: dense.
        backend: ``reference``, ``cpu``, ``triton`` or None (the device decides).
        pre_gate, post_gate: ``[batch, channels, seq]`` like u, or None. The Triton kernels apply them in
            registers (no gated copies of u or y in memory).

    Returns ``y [batch, channels, seq]`` in u's dtype, computed in float32 (float64 for float64 inputs).
    Differentiable in u, k and the gates.
    """
    kernel_len = check_inputs(u, k, kernel_len, keep_frequencies)
    check_gates(u, pre_gate, post_gate)
    chosen = choose_backend("fftconv", u.device, backend)
    if chosen == "triton":
        from .triton import fft_conv_triton

        return fft_conv_triton(u, k, kernel_len, keep_frequencies, pre_gate, post_gate)
    compute = torch.promote_types(u.dtype, torch.float32)
    w = u if pre_gate is None else u.to(compute) * pre_gate.to(compute)
    if chosen == "reference" and keep_frequencies is None:
        y = fft_conv_direct_reference(w, k, kernel_len)
    elif chosen == "reference":
        y = fft_conv_spectral_reference(w, k, kernel_len, keep_frequencies)
    else:
        y = fft_conv_cpu(w, k, kernel_len, keep_frequencies)
    if post_gate is not None:
        y = y.to(compute) * post_gate.to(compute)
    return y.to(u.dtype)
