"""Triton long causal convolution (FlashFFTConv style): a Monarch FFT as dense matmuls, fused per row.

The op and its definitions (partial and frequency-sparse convolutions) are those of :mod:`.reference`.

FFT size. The kernel transforms at ``M = max(256, n_fft)``, ``n_fft = 2 * next_power_of_two(seq)``: 256 is the
smallest size whose two Monarch factors are 16 wide (the ``tl.dot`` minimum on NVIDIA GPUs). The filter is
first turned, in torch (differentiable), into the length-``M`` time-domain filter ``kM`` whose circular
convolution gives the op exactly: dense filters are just ``k[:, :min(L, seq)]`` zero-padded; a frequency-sparse
filter is ``kt = irfft(rfft(k) * mask, n_fft)``, a circular filter of length ``n_fft`` whose taps ``s <= seq - 1``
act causally and whose taps ``s > n_fft - seq`` wrap around (lags ``s - n_fft``); ``kM`` places the first at
``s`` and the second at ``M - (n_fft - s)``. Its spectrum ``fft(kM) / M`` (torch.fft, once per call, fp32) is
the only filter the kernel sees.

Monarch FFT, order 2. ``M = N1 * N2`` (powers of two, ``N1 <= N2``), time index ``n = n1 + N1 n2``, frequency
``k = k2 + N2 k1``. With ``A[n1, n2] = x[n1 + N1 n2]`` (a ``[N1, N2]`` tile):

    X (row-major [N1, N2], natural order) = F_N1 @ ((A @ F_N2) * T),   T[n1, k2] = exp(-2 pi i n1 k2 / M)
    x = Re(((conj(F_N1) @ X) * conj(T)) @ conj(F_N2)) / M          (the inverse, back in A's layout)

so one row (batch b, channel c) is: load ``u`` as the real tile A (zero-padding ``n >= seq``), two real
matmuls (real input), the twiddle, four real matmuls (complex ``F_N1`` times complex), the pointwise product with
the filter spectrum, four real matmuls, the conjugate twiddle, two real matmuls for the real part only, store the
first ``seq`` outputs in u's dtype. Real and imaginary parts are separate fp32 tiles; DFT matrices and twiddles
are precomputed (fp64 -> fp32, cached per size and device).

Two tilings of the same algorithm (``_fftconv_kernel``):

- ``WHOLE`` (``M <= 4096``): the whole tile and the DFT matrices in registers, no scratch memory.
- blocked (larger ``M``): each matmul runs over ``[B1, B2]`` blocks; the stage outputs go through a per-program
  global scratch (``[programs, 4, M]`` fp32, L2-resident while small), with ``tl.debug_barrier`` between
  stages. The forward FFT's last stage and the inverse's first both work on whole columns (``k2`` fixed), so
  they run fused column block by column block. Programs are persistent (a grid of a few waves) so the scratch
  stays bounded.

Frequency-sparse filters with ``M == n_fft`` skip the blocked path's row blocks of the spectrum that are
entirely zero (bins ``keep <= k <= M - keep``).

Backward (``torch.autograd.Function``): ``du = flip(conv(flip(dy), kM))`` runs the same Triton kernel (exact for
sparse filters too: the correlation with ``kM`` is the convolution of the time-reversed signals);
``dkM = ifft(sum_b conj(fft(u, M)) * fft(dy, M))`` is ``_filter_grad_kernel`` (one program per channel: both
forward transforms per batch row, the product summed over the batch in registers, one inverse transform) when
``M <= 4096``, and torch.fft (rfft/irfft) above that; torch autograd maps ``dkM`` back to ``dk`` through the
construction of ``kM`` (a slice for dense filters; rfft, mask, irfft for sparse ones).

Not done: the real-input trick (a length-``M`` real FFT as a complex one of length ``M / 2``: the kernels use the
real input only to halve the first stage's matmuls), Monarch order 3, autotuning, the blocked tiling of the
filter gradient, fused gating.

Dot precision: fp32 inputs take ``ieee`` fp32 dots; fp16 ``tf32x3`` (about fp32 accuracy, 3 tensor-core dots);
bf16 ``tf32``. The interpreter computes every dot in exact fp32 (bf16 loads are cast to fp32 at once).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .reference import check_inputs, effective_kernel_len, kept_bins, sparse_fft_size

__all__ = ["fft_conv_triton", "fft_size"]

MIN_FFT = 256
"""Smallest transform: both Monarch factors 16 wide (the ``tl.dot`` minimum on NVIDIA GPUs)."""
WHOLE_MAX_FFT = 4096
"""Largest transform held whole in registers (``[64, 64]`` fp32 tiles)."""
BLOCK = 64
"""Block of the blocked tiling along each Monarch dimension."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER = triton_interpreter()
_TORCH_GRAD_ELEMENTS = 1 << 26
"""Complex elements per torch.fft spectrum in the filter gradient above the registers' size (512 MiB each)."""
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def fft_size(seq: int) -> int:
    """The kernel's transform size for ``seq`` samples: ``max(256, 2 * next_power_of_two(seq))``."""
    return max(MIN_FFT, sparse_fft_size(seq))


def _factors(M: int) -> tuple[int, int]:
    """``(N1, N2)`` powers of two with ``N1 * N2 = M``, ``N1 <= N2 <= 2 N1``."""
    m = M.bit_length() - 1
    return 1 << (m // 2), 1 << (m - m // 2)


@functools.lru_cache(maxsize=32)
def _dft_matrices(M: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fp32 ``(F1re, F1im, F2re, F2im, Tre, Tim)``: the DFT matrices of sizes N1, N2 and the twiddles ``[N1, N2]``
    (computed in fp64 with exact integer phases, then rounded once)."""
    N1, N2 = _factors(M)

    def unit(numerator: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = -2 * math.pi * (numerator % n).double() / n
        return torch.cos(angle).float().contiguous(), torch.sin(angle).float().contiguous()

    i1, i2 = torch.arange(N1, dtype=torch.int64), torch.arange(N2, dtype=torch.int64)
    f1 = unit(i1[:, None] * i1[None, :], N1)
    f2 = unit(i2[:, None] * i2[None, :], N2)
    tw = unit(i1[:, None] * i2[None, :], M)
    return tuple(t.to(device) for t in (*f1, *f2, *tw))


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cmm(ar, ai, br, bi, PREC: tl.constexpr):
    """Complex ``(ar + i ai) @ (br + i bi)`` as four real matmuls."""
    return _mm(ar, br, PREC) - _mm(ai, bi, PREC), _mm(ar, bi, PREC) + _mm(ai, br, PREC)


@triton.jit
def _cmm_conj_left(ar, ai, br, bi, PREC: tl.constexpr):
    """``conj(ar + i ai) @ (br + i bi)``."""
    return _mm(ar, br, PREC) + _mm(ai, bi, PREC), _mm(ar, bi, PREC) - _mm(ai, br, PREC)


@triton.jit
def _square(p, rows, cols, W: tl.constexpr):
    """fp32 block ``p[rows, cols]`` of a row-major matrix ``W`` wide."""
    return tl.load(p + rows[:, None] * W + cols[None, :])


@triton.jit
def _whole_fft(a, f1re, f1im, f2re, f2im, twre, twim, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
    """The spectrum (natural order, row-major ``[N1, N2]``) of the real tile ``a[n1, n2] = x[n1 + N1 n2]``."""
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    bre = _mm(a, _square(f2re, r2, r2, N2), PREC)
    bim = _mm(a, _square(f2im, r2, r2, N2), PREC)
    tre, tim = _square(twre, r1, r2, N2), _square(twim, r1, r2, N2)
    cre = bre * tre - bim * tim
    cim = bre * tim + bim * tre
    return _cmm(_square(f1re, r1, r1, N1), _square(f1im, r1, r1, N1), cre, cim, PREC)


@triton.jit
def _whole_ifft_real(ere, eim, f1re, f1im, f2re, f2im, twre, twim, N1: tl.constexpr, N2: tl.constexpr,
                     PREC: tl.constexpr):
    """``M x`` real part of the inverse transform of the spectrum ``ere + i eim``, in the layout of ``a``."""
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    gre, gim = _cmm_conj_left(_square(f1re, r1, r1, N1), _square(f1im, r1, r1, N1), ere, eim, PREC)
    tre, tim = _square(twre, r1, r2, N2), _square(twim, r1, r2, N2)
    hre = gre * tre + gim * tim
    him = gim * tre - gre * tim
    return _mm(hre, _square(f2re, r2, r2, N2), PREC) + _mm(him, _square(f2im, r2, r2, N2), PREC)


@triton.jit
def _whole_row(x_row, y_row, kre, kim, f1re, f1im, f2re, f2im, twre, twim, seq, N1: tl.constexpr,
               N2: tl.constexpr, PREC: tl.constexpr):
    """One row, every tile in registers."""
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    n = r1[:, None] + N1 * r2[None, :]
    a = tl.load(x_row + n, mask=n < seq, other=0.).to(tl.float32)
    dre, dim = _whole_fft(a, f1re, f1im, f2re, f2im, twre, twim, N1, N2, PREC)
    # the filter spectrum (already / M), natural order = row-major [N1, N2]
    sre, sim = _square(kre, r1, r2, N2), _square(kim, r1, r2, N2)
    y = _whole_ifft_real(dre * sre - dim * sim, dre * sim + dim * sre, f1re, f1im, f2re, f2im, twre, twim, N1, N2,
                         PREC)
    tl.store(y_row + n, y.to(y_row.dtype.element_ty), mask=n < seq)


@triton.jit
def _filter_grad_kernel(x, dy, dk, f1re, f1im, f2re, f2im, twre, twim, batch, channels, seq, N1: tl.constexpr,
                        N2: tl.constexpr, PREC: tl.constexpr):
    """Channel ``program_id(0)``: ``dk[c, p] = sum_b sum_t dy[b, c, t] x[b, c, t - p mod M]`` for every ``p <
    M``, as ``ifft(sum_b conj(X) DY)`` with the spectra summed in registers over the batch."""
    M: tl.constexpr = N1 * N2
    c = tl.program_id(0)
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    n = r1[:, None] + N1 * r2[None, :]
    acc_re = tl.zeros([N1, N2], dtype=tl.float32)
    acc_im = tl.zeros([N1, N2], dtype=tl.float32)
    for b in range(0, batch):
        row = (tl.cast(b, tl.int64) * channels + c) * seq
        a = tl.load(x + row + n, mask=n < seq, other=0.).to(tl.float32)
        xre, xim = _whole_fft(a, f1re, f1im, f2re, f2im, twre, twim, N1, N2, PREC)
        g = tl.load(dy + row + n, mask=n < seq, other=0.).to(tl.float32)
        gre, gim = _whole_fft(g, f1re, f1im, f2re, f2im, twre, twim, N1, N2, PREC)
        acc_re += xre * gre + xim * gim
        acc_im += xre * gim - xim * gre
    out = _whole_ifft_real(acc_re, acc_im, f1re, f1im, f2re, f2im, twre, twim, N1, N2, PREC) * (1.0 / M)
    tl.store(dk + tl.cast(c, tl.int64) * M + n, out)


@triton.jit
def _blocked_row(x_row, y_row, kre, kim, f1re, f1im, f2re, f2im, twre, twim, s, seq, KEEP, N1: tl.constexpr,
                 N2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, PREC: tl.constexpr):
    """One row by ``[B1, B2]`` blocks through the program's scratch ``s`` (``[4, N1 * N2]`` fp32: stage tiles
    C/E re, im, then the filtered spectrum re, im)."""
    M: tl.constexpr = N1 * N2
    o1 = tl.arange(0, B1)
    o2 = tl.arange(0, B2)
    # stage 1: C = (A @ F2) * T, by [B1, B2] blocks, summing over n2 blocks
    for i in range(0, N1 // B1):
        r1 = i * B1 + o1
        for j in range(0, N2 // B2):
            c2 = j * B2 + o2
            bre = tl.zeros([B1, B2], dtype=tl.float32)
            bim = tl.zeros([B1, B2], dtype=tl.float32)
            for kk in range(0, N2 // B2):
                k2 = kk * B2 + o2
                n = r1[:, None] + N1 * k2[None, :]
                a = tl.load(x_row + n, mask=n < seq, other=0.).to(tl.float32)
                bre += _mm(a, _square(f2re, k2, c2, N2), PREC)
                bim += _mm(a, _square(f2im, k2, c2, N2), PREC)
            tre, tim = _square(twre, r1, c2, N2), _square(twim, r1, c2, N2)
            p = r1[:, None] * N2 + c2[None, :]
            tl.store(s + p, bre * tre - bim * tim)
            tl.store(s + M + p, bre * tim + bim * tre)
    tl.debug_barrier()
    # stages 2-3, one column block of k2 at a time: D = F1 @ C, E = D * K, G = conj(F1) @ E, H = G * conj(T)
    for j in range(0, N2 // B2):
        c2 = j * B2 + o2
        for i in range(0, N1 // B1):
            r1 = i * B1 + o1
            p = r1[:, None] * N2 + c2[None, :]
            first = i * B1 * N2  # the block's lowest and highest natural-order bins
            last = first + B1 * N2 - 1
            ere = tl.zeros([B1, B2], dtype=tl.float32)
            eim = tl.zeros([B1, B2], dtype=tl.float32)
            if (first < KEEP) | (last > M - KEEP):
                dre = tl.zeros([B1, B2], dtype=tl.float32)
                dim = tl.zeros([B1, B2], dtype=tl.float32)
                for kk in range(0, N1 // B1):
                    k1 = kk * B1 + o1
                    q = k1[:, None] * N2 + c2[None, :]
                    xre, xim = _cmm(_square(f1re, r1, k1, N1), _square(f1im, r1, k1, N1), tl.load(s + q),
                                    tl.load(s + M + q), PREC)
                    dre += xre
                    dim += xim
                sre, sim = tl.load(kre + p), tl.load(kim + p)
                ere = dre * sre - dim * sim
                eim = dre * sim + dim * sre
            tl.store(s + 2 * M + p, ere)
            tl.store(s + 3 * M + p, eim)
        tl.debug_barrier()
        for i in range(0, N1 // B1):
            r1 = i * B1 + o1
            gre = tl.zeros([B1, B2], dtype=tl.float32)
            gim = tl.zeros([B1, B2], dtype=tl.float32)
            for kk in range(0, N1 // B1):
                first = kk * B1 * N2
                if (first < KEEP) | (first + B1 * N2 - 1 > M - KEEP):
                    k1 = kk * B1 + o1
                    q = k1[:, None] * N2 + c2[None, :]
                    xre, xim = _cmm_conj_left(_square(f1re, r1, k1, N1), _square(f1im, r1, k1, N1),
                                              tl.load(s + 2 * M + q), tl.load(s + 3 * M + q), PREC)
                    gre += xre
                    gim += xim
            tre, tim = _square(twre, r1, c2, N2), _square(twim, r1, c2, N2)
            p = r1[:, None] * N2 + c2[None, :]
            tl.store(s + p, gre * tre + gim * tim)
            tl.store(s + M + p, gim * tre - gre * tim)
        tl.debug_barrier()
    # stage 4: y = Re(H @ conj(F2)) = Hre @ F2re + Him @ F2im, first seq samples
    for i in range(0, N1 // B1):
        r1 = i * B1 + o1
        for j in range(0, N2 // B2):
            c2 = j * B2 + o2
            y = tl.zeros([B1, B2], dtype=tl.float32)
            for kk in range(0, N2 // B2):
                k2 = kk * B2 + o2
                q = r1[:, None] * N2 + k2[None, :]
                y += _mm(tl.load(s + q), _square(f2re, k2, c2, N2), PREC)
                y += _mm(tl.load(s + M + q), _square(f2im, k2, c2, N2), PREC)
            n = r1[:, None] + N1 * c2[None, :]
            tl.store(y_row + n, y.to(y_row.dtype.element_ty), mask=n < seq)
    tl.debug_barrier()


@triton.jit
def _fftconv_kernel(x, y, kre, kim, f1re, f1im, f2re, f2im, twre, twim, scratch, rows, channels, seq, KEEP,
                    N1: tl.constexpr, N2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, WHOLE: tl.constexpr,
                    PREC: tl.constexpr):
    """Rows ``program_id(0) + k * num_programs(0)`` of ``x [rows, seq]`` (row = batch * channels + channel) ->
    ``y``: the circular convolution, at ``M = N1 * N2``, with the filter whose spectrum / M is ``kre + i kim``
    ``[channels, M]`` (natural order)."""
    M: tl.constexpr = N1 * N2
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for row in range(pid, rows, programs):
        c = row % channels
        x_row = x + tl.cast(row, tl.int64) * seq
        y_row = y + tl.cast(row, tl.int64) * seq
        k_off = tl.cast(c, tl.int64) * M
        if WHOLE:
            _whole_row(x_row, y_row, kre + k_off, kim + k_off, f1re, f1im, f2re, f2im, twre, twim, seq, N1, N2,
                       PREC)
        else:
            _blocked_row(x_row, y_row, kre + k_off, kim + k_off, f1re, f1im, f2re, f2im, twre, twim,
                         scratch + pid.to(tl.int64) * 4 * M, seq, KEEP, N1, N2, B1, B2, PREC)


def _use_whole(M: int) -> bool:
    return M <= WHOLE_MAX_FFT


def _launch(x: torch.Tensor, spectrum: tuple[torch.Tensor, torch.Tensor], keep: int) -> torch.Tensor:
    """``x [batch, channels, seq]`` (contiguous) convolved with the filter of ``spectrum`` (``fft(kM) / M`` re,
    im ``[channels, M]`` fp32) -> ``[batch, channels, seq]`` in x's dtype. ``keep``: bins ``keep <= k <= M -
    keep`` of the spectrum are zero (0: none known zero)."""
    batch, channels, seq = x.shape
    M = spectrum[0].shape[-1]
    N1, N2 = _factors(M)
    y = _new_output(x.shape, x.dtype, x.device)
    rows = batch * channels
    if rows == 0:
        return y
    whole = _use_whole(M)
    if _INTERPRETER:
        programs, options = rows, {}
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(rows, sms * (8 if whole else 4))
        options = {"num_warps": 8 if M >= 2048 else 4}
    if whole:
        scratch = spectrum[0]  # unused
    else:
        scratch = torch.empty((programs, 4, M), dtype=torch.float32, device=x.device)
    B1, B2 = min(BLOCK, N1), min(BLOCK, N2)
    _fftconv_kernel[(programs,)](x, y, *spectrum, *_dft_matrices(M, x.device), scratch, rows, channels, seq,
                                 keep if keep > 0 else M, N1=N1, N2=N2, B1=B1, B2=B2, WHOLE=whole,
                                 PREC=_PRECISION[x.dtype], **options)
    return y


def _filter_grad(u: torch.Tensor, dy: torch.Tensor, M: int) -> torch.Tensor:
    """fp32 ``dkM [channels, M]``: the gradient of the length-``M`` circular filter, ``irfft(sum_b conj(rfft(u))
    rfft(dy))``: the Triton kernel when the transform fits in registers, torch.fft above that."""
    batch, channels, seq = u.shape
    if not _use_whole(M) or batch == 0:
        dk = _new_output((channels, M), torch.float32, u.device)
        step = max(1, _TORCH_GRAD_ELEMENTS // max(1, batch * M))  # channels per slice: bounded spectra
        for c in range(0, channels, step):
            U = torch.fft.rfft(u[:, c:c + step].float(), n=M)
            DY = torch.fft.rfft(dy[:, c:c + step].float(), n=M)
            dk[c:c + step] = torch.fft.irfft((U.conj() * DY).sum(0), n=M)
        return dk
    N1, N2 = _factors(M)
    dk = _new_output((channels, M), torch.float32, u.device)
    options = {} if _INTERPRETER else {"num_warps": 8 if M >= 2048 else 4}
    _filter_grad_kernel[(channels,)](u, dy, dk, *_dft_matrices(M, u.device), batch, channels, seq, N1=N1, N2=N2,
                                     PREC=_PRECISION[u.dtype], **options)
    return dk


def _circular_kernel(k: torch.Tensor, L: int, seq: int, keep_frequencies: float | None, M: int) -> torch.Tensor:
    """The fp32 length-``M`` filter ``kM [channels, M]`` whose circular convolution is the op (module docstring);
    differentiable in ``k``."""
    taps = effective_kernel_len(L, seq)
    k = k[:, :taps].float()
    if keep_frequencies is None:
        return torch.nn.functional.pad(k, (0, M - taps))
    n_fft = sparse_fft_size(seq)
    spectrum = torch.fft.rfft(k, n=n_fft)
    mask = torch.arange(spectrum.shape[-1], device=k.device) < kept_bins(keep_frequencies, n_fft)
    kt = torch.fft.irfft(spectrum * mask, n=n_fft)
    if M == n_fft:
        return kt
    causal, wrapped = kt[:, :seq], kt[:, n_fft - seq + 1:]
    middle = torch.zeros(k.shape[0], M - causal.shape[1] - wrapped.shape[1], dtype=kt.dtype, device=k.device)
    return torch.cat([causal, middle, wrapped], dim=1)


def _spectrum(kM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fft(kM) / M`` as contiguous fp32 real and imaginary parts (natural order)."""
    spectrum = torch.fft.fft(kM.float()) / kM.shape[-1]
    return spectrum.real.contiguous(), spectrum.imag.contiguous()


class _FFTConv(torch.autograd.Function):
    """``y = conv(u, kM)`` (circular at ``M``, first ``seq`` samples) with the Triton kernel forward and for
    ``du``; ``dkM`` through torch.fft."""

    @staticmethod
    def forward(ctx, u, kM, keep):
        spectrum = _spectrum(kM)
        y = _launch(u, spectrum, keep)
        ctx.save_for_backward(u, *spectrum)
        ctx.keep = keep
        ctx.M = kM.shape[-1]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, sre, sim = ctx.saved_tensors
        du = dkM = None
        if ctx.needs_input_grad[0]:
            du = _launch(dy.flip(-1).contiguous().to(u.dtype), (sre, sim), ctx.keep).flip(-1)
        if ctx.needs_input_grad[1]:
            dkM = _filter_grad(u, dy.contiguous().to(u.dtype), ctx.M)
        return du, dkM, None


def _check_triton_inputs(u: torch.Tensor, k: torch.Tensor) -> None:
    for name, tensor in (("u", u), ("k", k)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"fft_conv_triton takes fp16, bf16 or fp32 {name}, got {tensor.dtype}; cast it, or use "
                            "backend='cpu' or 'reference' for float64.")


def fft_conv_triton(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None,
                    keep_frequencies: float | None = None) -> torch.Tensor:
    """Causal long convolution ``y[b, c, t] = sum_{s <= min(t, L - 1)} k[c, s] u[b, c, t - s]`` on Triton kernels,
    differentiable in ``u`` and ``k`` (inputs checked by :func:`~.reference.check_inputs`).

    Args:
        u: ``[batch, channels, seq]`` fp32, fp16 or bf16.
        k: ``[channels, taps]`` fp32, fp16 or bf16, on u's device.
        kernel_len: use the first ``kernel_len`` taps (partial convolution); None: all.
        keep_frequencies: keep the lowest ``ceil(f * (n_fft // 2 + 1))`` bins of the filter's spectrum at
            ``n_fft = 2 * next_power_of_two(seq)`` (frequency-sparse convolution); None: dense.

    Returns ``y [batch, channels, seq]`` in u's dtype.
    """
    L = check_inputs(u, k, kernel_len, keep_frequencies)
    _check_triton_inputs(u, k)
    seq = u.shape[-1]
    M = fft_size(seq)
    keep = 0
    if keep_frequencies is not None and M == sparse_fft_size(seq):
        keep = kept_bins(keep_frequencies, M)
    kM = _circular_kernel(k, L, seq, keep_frequencies, M)
    return _FFTConv.apply(u.contiguous(), kM, keep)
