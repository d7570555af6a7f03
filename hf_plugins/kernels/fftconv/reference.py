"""Pure-torch long causal convolution (the FlashFFTConv op, Fu et al. 2024): the float64 test oracles.

Per channel ``c`` of ``u [batch, channels, seq]`` with the filter ``k [channels, taps]`` cut to its first
``L = kernel_len`` taps (a *partial* convolution; taps at or beyond ``seq`` never reach an output):

    y[b, c, t] = sum_{s = 0}^{min(t, L - 1)} k[c, s] * u[b, c, t - s]

*Frequency-sparse* convolution (``keep_frequencies = f`` in (0, 1]) is defined through one fixed FFT size,
``n_fft = 2 * next_power_of_two(seq)`` (room for the causal linear convolution without wrap-around, the size
FlashFFTConv and the Hyena models use), ``bins = n_fft // 2 + 1``: the filter spectrum
``K = rfft(k[:, :min(L, seq)], n_fft)`` keeps its lowest ``ceil(f * bins)`` bins (the rest are zeroed) and
``y = irfft(rfft(u, n_fft) * K, n_fft)[..., :seq]``. With every bin kept this is the causal convolution above.
Every backend shares these definitions (and :func:`check_inputs`, :func:`kept_bins`, :func:`sparse_fft_size`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "check_gates",
    "check_inputs",
    "compute_dtype",
    "effective_kernel_len",
    "fft_conv_direct_reference",
    "fft_conv_spectral_reference",
    "kept_bins",
    "next_power_of_two",
    "sparse_fft_size",
]


def compute_dtype(u_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """The math dtype of the fast paths: float32, or float64 when either input is float64."""
    return torch.promote_types(torch.promote_types(u_dtype, k_dtype), torch.float32)


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def sparse_fft_size(seq: int) -> int:
    """The FFT size that defines frequency-sparse convolution: ``2 * next_power_of_two(seq)``."""
    return 2 * next_power_of_two(seq)


def kept_bins(keep_frequencies: float, n_fft: int) -> int:
    """How many of the ``n_fft // 2 + 1`` rfft bins (the lowest) a frequency-sparse filter keeps."""
    return math.ceil(keep_frequencies * (n_fft // 2 + 1))


def effective_kernel_len(kernel_len: int, seq: int) -> int:
    """The taps that can reach an output of a length-``seq`` convolution: ``min(kernel_len, seq)``."""
    return min(kernel_len, seq)


def _check_tensor(name: str, value, dims: int, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fft_conv: {name} must be a torch.Tensor {shape_hint}, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"fft_conv: {name} must be a floating-point tensor, got {value.dtype}; cast it with "
                        ".float().")
    if value.dim() != dims or 0 in value.shape:
        raise ValueError(f"fft_conv: {name} must be a {dims}-D tensor {shape_hint} with no empty size, got shape "
                         f"{tuple(value.shape)}; a [batch, seq, channels] input needs .transpose(1, 2), and an "
                         "empty batch has nothing to convolve.")


def _check_kernel_len(kernel_len, taps: int) -> int:
    if kernel_len is None:
        return taps
    if isinstance(kernel_len, bool) or not isinstance(kernel_len, int):
        raise TypeError(f"fft_conv: kernel_len must be an int or None (all {taps} taps), got "
                        f"{type(kernel_len).__name__}.")
    if not 1 <= kernel_len <= taps:
        raise ValueError(f"fft_conv: kernel_len must be in [1, taps={taps}] (the filter's first kernel_len taps), "
                         f"got {kernel_len}; pass a longer k or a kernel_len <= {taps}.")
    return kernel_len


def _check_keep(keep_frequencies) -> None:
    if keep_frequencies is None:
        return
    if isinstance(keep_frequencies, bool) or not isinstance(keep_frequencies, (int, float)):
        raise TypeError(f"fft_conv: keep_frequencies must be a float in (0, 1] or None (dense), got "
                        f"{type(keep_frequencies).__name__}.")
    if not 0.0 < keep_frequencies <= 1.0:
        raise ValueError(f"fft_conv: keep_frequencies must be in (0, 1] (the fraction of the lowest filter "
                         f"frequencies kept), got {keep_frequencies}; use e.g. 0.25, or None for a dense "
                         "convolution.")


def check_inputs(u, k, kernel_len=None, keep_frequencies=None) -> int:
    """Validate an ``fft_conv`` call (``TypeError``/``ValueError`` naming the constraint, the value and the fix).

    Args:
        u: ``[batch, channels, seq]`` float; k: ``[channels, taps]`` float, on u's device.
        kernel_len: int in ``[1, taps]`` or None; keep_frequencies: float in ``(0, 1]`` or None.

    Returns the kernel length to use: ``kernel_len``, or ``taps`` when it is None.
    """
    _check_tensor("u", u, 3, "[batch, channels, seq]")
    _check_tensor("k", k, 2, "[channels, taps]")
    if k.shape[0] != u.shape[1]:
        raise ValueError(f"fft_conv: k must have one filter per channel of u, got k {list(k.shape)} for u "
                         f"{list(u.shape)} ({k.shape[0]} != {u.shape[1]} channels); pass k [channels, taps] with "
                         "channels = u.shape[1].")
    if k.device != u.device:
        raise ValueError(f"fft_conv: u is on {u.device} but k is on {k.device}; move k with .to(u.device).")
    _check_keep(keep_frequencies)
    return _check_kernel_len(kernel_len, k.shape[1])


def check_gates(u: torch.Tensor, pre_gate=None, post_gate=None) -> None:
    """Validate the optional gates of an ``fft_conv`` call: float tensors shaped and placed like ``u``."""
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if gate is None:
            continue
        if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
            kind = gate.dtype if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise TypeError(f"fft_conv: {name} must be a floating-point tensor like u or None, got {kind}.")
        if gate.shape != u.shape:
            raise ValueError(f"fft_conv: {name} must have u's shape {list(u.shape)} [batch, channels, seq], got "
                             f"{list(gate.shape)}; expand a broadcastable gate with .expand_as(u).")
        if gate.device != u.device:
            raise ValueError(f"fft_conv: u is on {u.device} but {name} is on {gate.device}; move it with "
                             ".to(u.device).")


def fft_conv_direct_reference(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None) -> torch.Tensor:
    """The causal convolution by definition, in float64: ``F.conv1d`` (a cross-correlation) of ``u`` left-padded
    with ``L - 1`` zeros against the flipped filter, one group per channel. Differentiable.

    Args:
        u: ``[batch, channels, seq]``; k: ``[channels, taps]``; kernel_len: taps used (None: all).

    Returns ``y [batch, channels, seq]`` float64.
    """
    seq = u.shape[-1]
    taps = effective_kernel_len(k.shape[1] if kernel_len is None else kernel_len, seq)
    weight = k[:, :taps].double().flip(-1)[:, None, :]
    return F.conv1d(F.pad(u.double(), (taps - 1, 0)), weight, groups=u.shape[1])


def fft_conv_spectral_reference(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None,
                                keep_frequencies: float | None = None) -> torch.Tensor:
    """The convolution through float64 ``torch.fft`` at ``n_fft = 2 * next_power_of_two(seq)``, the definition of
    frequency-sparse convolution (module docstring). Differentiable.

    Args:
        u: ``[batch, channels, seq]``; k: ``[channels, taps]``; kernel_len: taps used (None: all);
        keep_frequencies: fraction of the lowest filter bins kept (None: all).

    Returns ``y [batch, channels, seq]`` float64.
    """
    seq = u.shape[-1]
    taps = effective_kernel_len(k.shape[1] if kernel_len is None else kernel_len, seq)
    n_fft = sparse_fft_size(seq)
    spectrum = torch.fft.rfft(k[:, :taps].double(), n=n_fft)
    if keep_frequencies is not None:
        keep = torch.arange(spectrum.shape[-1], device=k.device) < kept_bins(keep_frequencies, n_fft)
        spectrum = spectrum * keep
    return torch.fft.irfft(torch.fft.rfft(u.double(), n=n_fft) * spectrum, n=n_fft)[..., :seq]
