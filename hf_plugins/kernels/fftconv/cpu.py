"""Long causal convolution on CPU: ``torch.fft`` (pocketfft/MKL) at a fast, exact FFT size, with the filter
spectrum cached across calls, or ``F.conv1d`` for short filters. Differentiable in u and k.

Choices measured on this machine (1 thread, fp32; ``benchmarks/fftconv_cpu.py``):

- FFT size (dense): the causal part of a circular convolution of size ``n`` is exact once
  ``n >= seq + L - 1``. Even ``2^a 3^b 5^c`` sizes transform at about the power-of-two cost per
  ``n log n`` (0.13-0.25 ns from 4k to 90k); odd ones (``16875``, ``32805``) cost ~2.5x that. So
  :func:`fast_fft_size` takes the smallest even 5-smooth size, up to ~2x fewer elements than the next power of
  two (``seq = 10000``: 20000 instead of 32768). Frequency-sparse calls use the size that defines them
  (``2 * next_power_of_two(seq)``, see :mod:`.reference`).
- Short filters: a depthwise ``F.conv1d`` costs ``O(seq * L)`` against the FFT's ``O(seq log seq)``. Forward
  only (cached spectrum), it wins up to ~24 taps at seq 1k, ~64 at 4k, ~100 at 16k: :data:`DIRECT_MAX_TAPS`
  = 32. Its backward is slow (depthwise conv backward), so with gradients the crossing is ~10-24 taps:
  :data:`DIRECT_MAX_TAPS_GRAD` = 16. (64 channels; e.g. seq 16k, 32 taps: fwd 0.63 vs 1.17 ms,
  fwd + bwd 7.0 vs 4.95 ms.)
- Gradients: a hand-written backward (:class:`_SpectralConv`) does one ``rfft`` of the output gradient and
  one ``irfft`` per input; autograd through ``torch.fft`` would run full complex transforms for the
  ``rfft`` backward, ~2x the work.
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

__all__ = ["DIRECT_MAX_TAPS", "DIRECT_MAX_TAPS_GRAD", "SPECTRUM_CACHE", "KernelSpectrumCache", "dense_fft_size",
           "fast_fft_size", "fft_conv_cpu"]

DIRECT_MAX_TAPS = 32
"""Dense calls with at most this many taps (after cutting to ``seq``) run ``F.conv1d`` instead of the FFT..."""
DIRECT_MAX_TAPS_GRAD = 16
"""... or this many when a gradient is needed (the depthwise ``conv1d`` backward is slow)."""


@functools.lru_cache(maxsize=None)
def fast_fft_size(n: int) -> int:
    """The smallest even ``2^a 3^b 5^c >= n`` (``a >= 1``): sizes pocketfft/MKL transform at power-of-two speed
    (odd ones run ~2.5x slower, module docstring)."""
    best = max(2, next_power_of_two(n))
    odd5 = 1
    while odd5 < best:
        odd = odd5
        while odd < best:
            size = 2 * odd
            while size < n:
                size *= 2
            best = min(best, size)
            odd *= 3
        odd5 *= 5
    return best


def dense_fft_size(seq: int, taps: int) -> int:
    """The FFT size of a dense call: the fast size holding the causal linear convolution, ``seq + taps - 1``."""
    return fast_fft_size(seq + taps - 1)


def _rfft(x: torch.Tensor, n_fft: int, bins: int) -> torch.Tensor:
    """The lowest ``bins`` bins of ``rfft(x, n_fft)`` along the last dim: ``[..., length]`` -> ``[..., bins]``."""
    return torch.fft.rfft(x, n=n_fft)[..., :bins]


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
    the cached lookups. The caller keeps calls whose ``k`` needs a gradient away from it.
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
        if k.is_inference():
            return _rfft(k[:, :taps].to(dtype), n_fft, bins)
        key = (id(k), taps, n_fft, bins, dtype)
        entry = self._entries.get(key)
        if entry is not None and entry.kernel() is k and entry.version == k._version:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry.spectrum
        self.misses += 1
        with torch.no_grad():
            spectrum = _rfft(k[:, :taps].to(dtype), n_fft, bins).contiguous()
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


class _SpectralConv(torch.autograd.Function):
    """``y = irfft(rfft(u, n)[..., :bins] * K, n)[..., :N]`` with ``K = rfft(k, n)[:, :bins]`` (or a given
    ``spectrum``), and its exact backward: with ``DY = rfft(dy, n)[..., :bins]``,
    ``du = irfft(DY * conj(K), n)[..., :N]`` and ``dk = irfft(sum_b DY * conj(U), n)[..., :taps]`` (circular
    correlations; ``n >= N + taps - 1`` keeps them free of wrap-around, and the kept-bin mask is symmetric)."""

    @staticmethod
    def forward(ctx, u, k, spectrum, n_fft, bins):
        """``u [B, C, N]``; ``k [C, taps]`` (differentiated) or None with ``spectrum [C, bins]`` (a frozen filter);
        all in the math dtype."""
        if spectrum is None:
            spectrum = _rfft(k, n_fft, bins)
        transform = _rfft(u, n_fft, bins)
        ctx.n_fft, ctx.seq, ctx.taps = n_fft, u.shape[-1], None if k is None else k.shape[-1]
        ctx.save_for_backward(transform if ctx.needs_input_grad[1] else None, spectrum)
        if ctx.needs_input_grad[1]:
            product = transform * spectrum
        else:
            product = transform.mul_(spectrum)  # not saved: reuse the transform's buffer
        # a copy: the view would keep the whole n_fft-long buffer alive with y
        return torch.fft.irfft(product, n=n_fft)[..., :ctx.seq].contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        transform, spectrum = ctx.saved_tensors
        grad = _rfft(dy, ctx.n_fft, spectrum.shape[-1])
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(grad * spectrum.conj(), n=ctx.n_fft)[..., :ctx.seq]
        if ctx.needs_input_grad[1]:
            dk = torch.fft.irfft((grad * transform.conj()).sum(0), n=ctx.n_fft)[..., :ctx.taps]
        return du, dk, None, None, None


def _spectral(u: torch.Tensor, k: torch.Tensor, taps: int, n_fft: int, bins: int, dtype: torch.dtype,
              cache: KernelSpectrumCache) -> torch.Tensor:
    """``u [B, C, N]`` convolved with ``k[:, :taps]`` through ``n_fft``-point transforms keeping ``bins`` bins,
    in ``dtype``; the filter spectrum comes from ``cache`` unless a gradient must reach ``k``."""
    if torch.is_grad_enabled() and k.requires_grad:
        return _SpectralConv.apply(u.to(dtype), k[:, :taps].to(dtype), None, n_fft, bins)
    return _SpectralConv.apply(u.to(dtype), None, cache.spectrum(k, taps, n_fft, bins, dtype), n_fft, bins)


def fft_conv_cpu(u: torch.Tensor, k: torch.Tensor, kernel_len: int, keep_frequencies: float | None = None,
                 cache: KernelSpectrumCache = SPECTRUM_CACHE, direct_max_taps: int | None = None,
                 ) -> torch.Tensor:
    """Causal (optionally frequency-sparse) convolution, inputs checked by :func:`~.reference.check_inputs`.

    Args:
        u: ``[batch, channels, seq]``; k: ``[channels, taps]``; any float dtypes.
        kernel_len: taps used, in ``[1, taps]``.
        keep_frequencies: fraction of the lowest filter bins kept at ``n_fft = 2 * next_power_of_two(seq)``, or
            None (dense).
        cache: where filter spectra are reused (``SPECTRUM_CACHE``).
        direct_max_taps: dense calls with at most this many effective taps run ``F.conv1d``; None:
            :data:`DIRECT_MAX_TAPS`, or :data:`DIRECT_MAX_TAPS_GRAD` when a gradient is needed.

    Returns ``y [batch, channels, seq]`` in u's dtype, computed in float32 (float64 if an input is float64).
    """
    seq = u.shape[-1]
    taps = effective_kernel_len(kernel_len, seq)
    dtype = compute_dtype(u.dtype, k.dtype)
    if keep_frequencies is not None:
        n_fft = sparse_fft_size(seq)
        bins = kept_bins(keep_frequencies, n_fft)
        if bins < n_fft // 2 + 1:
            return _spectral(u, k, taps, n_fft, bins, dtype, cache).to(u.dtype)
    if direct_max_taps is None:
        needs_grad = torch.is_grad_enabled() and (u.requires_grad or k.requires_grad)
        direct_max_taps = DIRECT_MAX_TAPS_GRAD if needs_grad else DIRECT_MAX_TAPS
    if taps <= direct_max_taps:
        return _direct(u, k, taps, dtype).to(u.dtype)
    n_fft = dense_fft_size(seq, taps)
    return _spectral(u, k, taps, n_fft, n_fft // 2 + 1, dtype, cache).to(u.dtype)
