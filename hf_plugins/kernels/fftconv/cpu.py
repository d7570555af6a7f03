"""Long causal convolution on CPU: ``torch.fft`` (pocketfft/MKL) at a fast, exact FFT size, with the filter
spectrum cached across calls, or ``F.conv1d`` for short filters. Differentiable in u and k.

Choices measured on this machine (1 thread, fp32; ``benchmarks/fftconv_cpu.py``):

- FFT size (dense): the causal part of a circular convolution of size ``n`` is exact once
  ``n >= seq + L - 1``; the smallest such ``2^a 3^b 5^c`` (:func:`fast_fft_size`) runs as fast per element as
  a power of two, so for ``seq + L - 1`` just above a power of two it is up to ~2x faster than the next one.
  Frequency-sparse calls use the size that defines them (``2 * next_power_of_two(seq)``, see :mod:`.reference`).
- Explicit zero padding: ``rfft(F.pad(u, ...))`` is ~4x faster than ``rfft(u, n=n)`` for ``n > seq``
  (torch 2.13 pads inside the FFT on a slow path), so the input is padded first.
- Short filters: a depthwise ``F.conv1d`` costs ``O(seq * L)`` against the FFT's ``O(seq log seq)``; it wins up
  to :data:`DIRECT_MAX_TAPS` taps at every length measured (256 to 16k).
- The filter spectrum ``rfft(k)`` is cached (:class:`KernelSpectrumCache`) when no gradient must reach ``k``
  (eval / ``no_grad``), keyed by the tensor, its in-place version counter and the FFT geometry. Frequency-sparse
  spectra are stored cut to their kept bins, and the product is cut too: ``irfft`` of the shorter spectrum at
  ``n_fft`` equals zeroing the rest.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import compute_dtype, effective_kernel_len, kept_bins, next_power_of_two, sparse_fft_size

__all__ = ["DIRECT_MAX_TAPS", "SPECTRUM_CACHE", "KernelSpectrumCache", "dense_fft_size", "fast_fft_size",
           "fft_conv_cpu"]

DIRECT_MAX_TAPS = 32
"""Dense calls with at most this many taps (after cutting to ``seq``) run ``F.conv1d`` instead of the FFT."""


@functools.lru_cache(maxsize=None)
def fast_fft_size(n: int) -> int:
    """The smallest ``2^a 3^b 5^c >= n`` (``n >= 1``): sizes pocketfft/MKL transform at power-of-two speed."""
    best = next_power_of_two(n)
    odd5 = 1
    while odd5 < best:
        odd = odd5
        while odd < best:
            size = odd
            while size < n:
                size *= 2
            best = min(best, size)
            odd *= 3
        odd5 *= 5
    return best


def dense_fft_size(seq: int, taps: int) -> int:
    """The FFT size of a dense call: the fast size holding the causal linear convolution, ``seq + taps - 1``."""
    return fast_fft_size(seq + taps - 1)


def _rfft(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    """``rfft(x, n_fft)`` along the last dim, zero-padding explicitly (the fast path, module docstring)."""
    return torch.fft.rfft(F.pad(x, (0, n_fft - x.shape[-1])))


@dataclass(frozen=True)
class _Entry:
    kernel: weakref.ref
    version: int
    spectrum: torch.Tensor


class KernelSpectrumCache:
    """Filter spectra ``rfft(k[:, :taps], n_fft)[:, :bins]`` reused while the same ``k`` tensor is unchanged.

    An entry is found by ``id(k)`` and the geometry, and used only if it still refers to that very tensor
    (a weak reference: a dead tensor's id can be reused) at the same ``k._version`` (in-place updates such as
    ``optimizer.step()`` or ``load_state_dict`` bump it). An entry goes when its ``k`` is freed, or when more
    than ``max_entries`` are held (least recently used first). Only calls where no gradient must reach ``k``
    use it, and never inference-mode tensors (they have no version counter). ``hits`` and ``misses`` count
    the cached lookups.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._entries.clear()
        self.hits = self.misses = 0

    def spectrum(self, k: torch.Tensor, taps: int, n_fft: int, bins: int, dtype: torch.dtype) -> torch.Tensor:
        """``rfft(k[:, :taps] in dtype, n_fft)[:, :bins]``: ``k [channels, >= taps]`` -> ``[channels, bins]``
        complex, from the cache when allowed (class docstring)."""
        if (torch.is_grad_enabled() and k.requires_grad) or k.is_inference():
            return _rfft(k[:, :taps].to(dtype), n_fft)[:, :bins]
        key = (id(k), taps, n_fft, bins, dtype)
        entry = self._entries.get(key)
        if entry is not None and entry.kernel() is k and entry.version == k._version:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry.spectrum
        self.misses += 1
        with torch.no_grad():
            spectrum = _rfft(k[:, :taps].to(dtype), n_fft)[:, :bins].contiguous()
        entries = self._entries
        entries[key] = _Entry(weakref.ref(k, lambda _dead: entries.pop(key, None)), k._version, spectrum)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return spectrum


SPECTRUM_CACHE = KernelSpectrumCache()
"""The cache :func:`fft_conv_cpu` uses by default (so ``fft_conv`` and ``FFTConv`` reuse spectra)."""


def _direct(u: torch.Tensor, k: torch.Tensor, taps: int, dtype: torch.dtype) -> torch.Tensor:
    """Depthwise ``F.conv1d`` of the left-padded ``u [B, C, N]`` with the flipped ``k[:, :taps]`` -> ``[B, C, N]``."""
    weight = k[:, :taps].to(dtype).flip(-1)[:, None, :]
    return F.conv1d(F.pad(u.to(dtype), (taps - 1, 0)), weight, groups=u.shape[1])


def _spectral(u: torch.Tensor, spectrum: torch.Tensor, n_fft: int, dtype: torch.dtype) -> torch.Tensor:
    """``irfft(rfft(u, n_fft)[..., :bins] * spectrum, n_fft)[..., :N]`` for ``u [B, C, N]``, ``spectrum [C, bins]``."""
    product = _rfft(u.to(dtype), n_fft)[..., :spectrum.shape[-1]]
    if torch.is_grad_enabled() and (product.requires_grad or spectrum.requires_grad):
        product = product * spectrum
    else:
        product.mul_(spectrum)  # nothing to differentiate: reuse the transform's buffer
    return torch.fft.irfft(product, n=n_fft)[..., :u.shape[-1]]


def fft_conv_cpu(u: torch.Tensor, k: torch.Tensor, kernel_len: int, keep_frequencies: float | None = None,
                 cache: KernelSpectrumCache = SPECTRUM_CACHE, direct_max_taps: int = DIRECT_MAX_TAPS,
                 ) -> torch.Tensor:
    """Causal (optionally frequency-sparse) convolution, inputs checked by :func:`~.reference.check_inputs`.

    Args:
        u: ``[batch, channels, seq]``; k: ``[channels, taps]``; any float dtypes.
        kernel_len: taps used, in ``[1, taps]``.
        keep_frequencies: fraction of the lowest filter bins kept at ``n_fft = 2 * next_power_of_two(seq)``, or
            None (dense).
        cache: where filter spectra are reused (``SPECTRUM_CACHE``).
        direct_max_taps: dense calls with at most this many effective taps run ``F.conv1d``.

    Returns ``y [batch, channels, seq]`` in u's dtype, computed in float32 (float64 if an input is float64).
    """
    seq = u.shape[-1]
    taps = effective_kernel_len(kernel_len, seq)
    dtype = compute_dtype(u.dtype, k.dtype)
    if keep_frequencies is not None:
        n_fft = sparse_fft_size(seq)
        bins = kept_bins(keep_frequencies, n_fft)
        if bins < n_fft // 2 + 1:
            y = _spectral(u, cache.spectrum(k, taps, n_fft, bins, dtype), n_fft, dtype)
            return y.to(u.dtype)
    if taps <= direct_max_taps:
        return _direct(u, k, taps, dtype).to(u.dtype)
    n_fft = dense_fft_size(seq, taps)
    y = _spectral(u, cache.spectrum(k, taps, n_fft, n_fft // 2 + 1, dtype), n_fft, dtype)
    return y.to(u.dtype)
