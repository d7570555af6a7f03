"""Triton long causal convolution (FlashFFTConv style): the FFT as a Monarch decomposition whose every stage is a
dense matmul, fused per row with the zero padding, the optional Hyena gates, the product with the filter spectrum
and the inverse transform; forward and backward.

The op and its definitions (partial and frequency-sparse convolutions) are those of :mod:`.reference`; with gates
it is ``y = post_gate * conv(pre_gate * u, k)`` (FlashFFTConv's ``pregate``/``postgate``, Hyena's ``x_1``/``x_0``).

FFT size. The kernels transform at ``M = max(256, n_fft)``, ``n_fft = 2 * next_power_of_two(seq)``: 256 is the
smallest size whose Monarch factors are 16 wide (the ``tl.dot`` minimum on NVIDIA GPUs). The filter is first
turned, in torch (differentiable), into the time-domain filter ``kt`` (``[channels, taps]``, ``taps <= M``) whose
circular convolution at ``M`` (zero-padded) gives the op exactly: a dense filter is just ``k[:, :min(L, seq)]``
(``taps <= seq <= M / 2``); a frequency-sparse one is ``irfft(rfft(k) * mask, n_fft)``, a circular filter of
length ``n_fft`` whose taps ``s <= seq - 1`` act causally and whose taps ``s > n_fft - seq`` wrap around (lags
``s - n_fft``), placed at ``s`` and ``M - (n_fft - s)`` in a length-``M`` filter. Its spectrum ``fft(kt, M) / M``
(torch.fft, once per call, fp32) is the only filter the convolution kernels see.

Order 2, in registers (``M <= 2048``, ``_whole_conv_kernel``). ``M = N1 * N2``, time ``n = n1 + N1 n2``,
frequency ``k = k2 + N2 k1``; with the tile ``A[n1, n2] = x[n1 + N1 n2]``:

    X (row-major [N1, N2], natural order) = F_N1 @ ((A @ F_N2) * T),   T[n1, k2] = exp(-2 pi i n1 k2 / M)
    x = ((conj(F_N1) @ X) * conj(T)) @ conj(F_N2) / M                (the inverse, back in A's layout)

Orders 2 to 4, through scratch memory (``M > 2048``, ``_staged_conv_kernel``). ``M = D0 D1 .. D_{r-1}`` (digits
16..64 wide), time ``n = sum_s n_s S_s`` with ``S_s = D_{s+1} .. D_{r-1}`` (``n_0`` most significant). Stage ``s``
is a DFT of length ``D_s`` along digit ``s`` for every other digit, ``[rows, D_s] @ F_{D_s}``, times the twiddle
``exp(-2 pi i i_s k_s / (D_s S_s))`` (``i_s`` the digits after ``s``): decimation in frequency, which leaves
frequency ``f = k_0 + D_0 (k_1 + D_1 (k_2 + ..))`` at position ``p = sum_s k_s S_s``. The filter spectrum is stored
in that digit-reversed order, so no reordering is ever done: the inverse runs the stages backwards (conjugate
twiddle, then ``conj(F)``) and lands in natural time order. The last forward stage, the filter product and the
first inverse stage touch the same rows and run fused. Each program works in place on its own ``[2, M]`` fp32
scratch (L2-resident while small); programs are persistent, ``tl.debug_barrier`` separates the stages.

Work skipped (FlashFFTConv's sparsity of the decomposition):

- Zero padding: ``seq <= M / 2`` always, so the most significant time digit (``n2`` in order 2, ``n_0`` in the
  staged path) is below half its range for every nonzero input and every wanted output: the first forward stage
  multiplies by only the upper half of its DFT matrix, and the last inverse stage computes only half its columns.
- Real signals: two batch rows of the same channel travel as one complex signal ``u_b + i u_{b+1}`` (the filter is
  real, so the real and imaginary parts of the result are the two convolutions): each transform serves two rows.
  A lone row (batch 1, or the last of an odd batch) uses the real-input form of the first and last stages.
- Frequency-sparse filters (``M == n_fft``): in the staged path the fused middle stage works by 16-wide column
  blocks of its digit (the most significant frequency digit) and skips the blocks whose every bin is zero. The
  first and last blocks always hold bins (the lowest frequencies and their conjugates), so this saves work once
  that digit is 64 wide (``M >= 65536``, :func:`fft_digits`): up to half the middle stage.
- Partial convolutions: the filter gradient is computed for the filter's taps only; its last inverse stage
  computes the columns of the most significant time digit those taps reach (``n < taps``, at least 16 wide),
  half of them for any dense filter, fewer for short ones.

Backward (``torch.autograd.Function``): with ``w = pre * u`` and ``z = conv(w, kt)`` (stored by the forward when
the post gate needs a gradient), ``dz = dy * post``; ``dw = flip(conv(flip(dz), kt))`` runs the same kernels,
reading and writing time-reversed and applying the gates in registers (``du = pre * dw``, and ``dw`` itself for
``d pre = dw * u``); ``d post = dy * z``; ``dkt = ifft(sum_b conj(fft(w, M)) * fft(dz, M))[:, :taps]`` is
``_whole_filter_grad_kernel`` or ``_staged_filter_grad_kernel`` (a program per channel: both forward transforms
per batch row with the gates applied on load, the product summed over the batch, one inverse transform). Torch
autograd maps ``dkt`` back to ``dk`` through the construction of ``kt``.

Not done: autotuning (tile sizes, warps and the scratch budget are fixed guesses until a GPU measures them).

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

from .reference import check_gates, check_inputs, effective_kernel_len, kept_bins, sparse_fft_size

__all__ = ["fft_conv_triton", "fft_digits", "fft_size"]

MIN_FFT = 256
"""Smallest transform: both order-2 factors 16 wide (the ``tl.dot`` minimum on NVIDIA GPUs)."""
WHOLE_MAX_FFT = 2048
"""Largest transform held whole in registers (``[32, 64]`` fp32 tiles; at 4096 the dot operands would need 352 KiB
of shared memory, more than any GPU has); larger ones take the staged path."""
MIN_DIGIT = 16
"""Narrowest matmul dimension of any stage (the ``tl.dot`` minimum): halved stages and sparse column blocks."""
MAX_DIGIT = 64
"""Widest digit of the staged path (a ``[64, 64]`` complex DFT matrix per stage)."""
MAX_DIGITS = 4
"""Most digits the staged kernels take: ``M <= MAX_DIGIT ** 4`` (sequences up to 8M at 64)."""
TILE = 2048
"""Elements of one ``[rows, digit]`` block of a stage (2048: at most 136 KiB of shared memory for the dot
operands, within sm_80's 163 KiB; 4096 would not fit there)."""
SCRATCH_BYTES = 256 << 20
"""Bound on the staged kernels' scratch memory: it limits the persistent programs."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER = triton_interpreter()
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32x3", torch.bfloat16: "tf32"}


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def fft_size(seq: int) -> int:
    """The kernel's transform size for ``seq`` samples: ``max(256, 2 * next_power_of_two(seq))``."""
    return max(MIN_FFT, sparse_fft_size(seq))


def _factors(M: int) -> tuple[int, int]:
    """Order-2 factors ``(N1, N2)``: powers of two with ``N1 * N2 = M``, ``N1 <= N2 <= 2 N1``."""
    m = M.bit_length() - 1
    return 1 << (m // 2), 1 << (m - m // 2)


def fft_digits(M: int) -> tuple[int, ...]:
    """The staged path's digits ``(D0, .., D_{r-1})``: the fewest powers of two in ``[MIN_DIGIT, MAX_DIGIT]``
    whose product is ``M``, as even as possible. ``D0`` is halved by the zero padding, so it must be at least
    ``2 * MIN_DIGIT``; the last digit is the most significant frequency digit, whose ``MIN_DIGIT``-wide blocks a
    frequency-sparse filter skips, so the widest goes there once another digit can be ``D0``."""
    bits = M.bit_length() - 1
    wide = MAX_DIGIT.bit_length() - 1
    count = -(-bits // wide)
    base, extra = divmod(bits, count)
    widest_first = [1 << (base + (s < extra)) for s in range(count)]
    if count > MAX_DIGITS or widest_first[-1] < MIN_DIGIT:
        raise ValueError(f"fft_conv_triton: a {M}-point transform needs {count} digits of at most {MAX_DIGIT}, more "
                         f"than the {MAX_DIGITS} the kernels take; use a shorter sequence or backend='cpu'.")
    if count >= 3 and widest_first[1] >= 2 * MIN_DIGIT:
        return (widest_first[1], *widest_first[2:], widest_first[0])
    return (widest_first[0], *widest_first[2:], widest_first[1]) if count >= 2 else tuple(widest_first)


def _half(width: int) -> int:
    """Columns a halved stage keeps: ``width / 2`` when that is still a valid matmul dimension."""
    return width // 2 if width // 2 >= MIN_DIGIT else width


@functools.lru_cache(maxsize=32)
def _dft_matrices(M: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Order 2, fp32 ``(F1re, F1im, F2re, F2im, Tre, Tim)``: the DFT matrices of sizes N1, N2 and the twiddles
    ``[N1, N2]`` (computed in fp64 with exact integer phases, then rounded once)."""
    N1, N2 = _factors(M)
    i1, i2 = torch.arange(N1, dtype=torch.int64), torch.arange(N2, dtype=torch.int64)
    return tuple(t.to(device) for t in (*_unit(i1[:, None] * i1[None, :], N1), *_unit(i2[:, None] * i2[None, :], N2),
                                        *_unit(i1[:, None] * i2[None, :], M)))


@functools.lru_cache(maxsize=32)
def _twiddles(M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The staged path's one table ``exp(-2 pi i j / M)``, ``j < M`` (re, im fp32): every DFT matrix and twiddle
    of every stage is a gather from it."""
    return tuple(t.to(device) for t in _unit(torch.arange(M, dtype=torch.int64), M))


def _unit(numerator: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(-2 pi i numerator / n)`` as contiguous fp32 (re, im), the phase reduced exactly in integers first."""
    angle = -2 * math.pi * (numerator % n).double() / n
    return torch.cos(angle).float().contiguous(), torch.sin(angle).float().contiguous()


@functools.lru_cache(maxsize=32)
def _digit_reversal(digits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[M]`` int64: the frequency each position of the staged path's spectrum holds (module docstring)."""
    frequency = torch.zeros(1, dtype=torch.int64)
    place = 1
    for digit in digits:  # position digits k_s, most significant first; frequency weight D_0 .. D_{s-1}
        frequency = (frequency[:, None] + place * torch.arange(digit)[None, :]).reshape(-1)
        place *= digit
    return frequency.to(device)


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
def _cmm_conj_right(ar, ai, br, bi, PREC: tl.constexpr):
    """``(ar + i ai) @ conj(br + i bi)``."""
    return _mm(ar, br, PREC) + _mm(ai, bi, PREC), _mm(ai, br, PREC) - _mm(ar, bi, PREC)


@triton.jit
def _square(p, rows, cols, W: tl.constexpr):
    """fp32 block ``p[rows, cols]`` of a row-major matrix ``W`` wide."""
    return tl.load(p + rows[:, None] * W + cols[None, :])


@triton.jit
def _load_signal(x, gate, off, n, seq, limit, HAS_GATE: tl.constexpr, REVERSE: tl.constexpr):
    """fp32 ``x[off + t]`` (times ``gate[off + t]``) at time ``t = n`` (``seq - 1 - n`` if REVERSE); zero where
    ``n >= limit`` (``seq``, or 0 for a row that does not exist)."""
    mask = n < limit
    if REVERSE:
        t = seq - 1 - n
    else:
        t = n
    a = tl.load(x + off + t, mask=mask, other=0.).to(tl.float32)
    if HAS_GATE:
        a = a * tl.load(gate + off + t, mask=mask, other=0.).to(tl.float32)
    return a


@triton.jit
def _store_signal(y, z, gate, off, n, seq, limit, value, HAS_GATE: tl.constexpr, STORE_Z: tl.constexpr,
                  REVERSE: tl.constexpr):
    """``y[off + t] = value * gate[off + t]`` (and ``z[off + t] = value``) at ``t`` as in :func:`_load_signal`."""
    mask = n < limit
    if REVERSE:
        t = seq - 1 - n
    else:
        t = n
    if STORE_Z:
        tl.store(z + off + t, value.to(z.dtype.element_ty), mask=mask)
    if HAS_GATE:
        value = value * tl.load(gate + off + t, mask=mask, other=0.).to(tl.float32)
    tl.store(y + off + t, value.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _rows_of(item, batch, channels, seq, PAIRED: tl.constexpr):
    """Work item -> (channel, offset of its first row, offset of its second row, that row's length: ``seq``, or 0
    if it does not exist): a pair of batch rows ``2j, 2j + 1`` of one channel if PAIRED, else the row ``item``."""
    c = item % channels
    if PAIRED:
        b = (item // channels) * 2
        first = (tl.cast(b, tl.int64) * channels + c) * seq
        return c, first, first + tl.cast(channels, tl.int64) * seq, tl.where(b + 1 < batch, seq, 0)
    first = tl.cast(item, tl.int64) * seq
    return c, first, first, 0


@triton.jit
def _whole_forward(are, aim, f1re, f1im, f2re, f2im, twre, twim, N1: tl.constexpr, N2: tl.constexpr,
                   NH: tl.constexpr, PAIRED: tl.constexpr, PREC: tl.constexpr):
    """Order 2: the spectrum (natural order, row-major ``[N1, N2]``) of ``a[n1, n2] = x[n1 + N1 n2]`` given as its
    first ``NH`` columns ``[N1, NH]`` (the rest are zero padding); ``a`` is ``are + i aim`` if PAIRED, else real."""
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    h = tl.arange(0, NH)
    gre, gim = _square(f2re, h, r2, N2), _square(f2im, h, r2, N2)
    if PAIRED:
        bre, bim = _cmm(are, aim, gre, gim, PREC)
    else:
        bre = _mm(are, gre, PREC)
        bim = _mm(are, gim, PREC)
    tre, tim = _square(twre, r1, r2, N2), _square(twim, r1, r2, N2)
    return _cmm(_square(f1re, r1, r1, N1), _square(f1im, r1, r1, N1), bre * tre - bim * tim, bre * tim + bim * tre,
                PREC)


@triton.jit
def _whole_inverse(ere, eim, f1re, f1im, f2re, f2im, twre, twim, N1: tl.constexpr, N2: tl.constexpr,
                   PREC: tl.constexpr):
    """Order 2, inverse up to its last stage: ``(conj(F_N1) @ E) * conj(T)`` ``[N1, N2]``; ``M x`` is this
    times ``conj(F_N2)``."""
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    gre, gim = _cmm_conj_left(_square(f1re, r1, r1, N1), _square(f1im, r1, r1, N1), ere, eim, PREC)
    tre, tim = _square(twre, r1, r2, N2), _square(twim, r1, r2, N2)
    return gre * tre + gim * tim, gim * tre - gre * tim


@triton.jit
def _whole_conv_kernel(x, pre, post, y, z, kre, kim, f1re, f1im, f2re, f2im, twre, twim, batch, channels, seq,
                       N1: tl.constexpr, N2: tl.constexpr, NH: tl.constexpr, HAS_PRE: tl.constexpr,
                       HAS_POST: tl.constexpr, STORE_Z: tl.constexpr, PAIRED: tl.constexpr, REVERSE: tl.constexpr,
                       PREC: tl.constexpr):
    """Items ``program_id(0) + j * num_programs(0)`` (:func:`_rows_of`) of ``x [batch, channels, seq]`` ->
    ``y``: the circular convolution at ``M = N1 * N2`` with the filter whose spectrum / M is ``kre + i kim``
    ``[channels, M]`` (natural order), every tile in registers."""
    M: tl.constexpr = N1 * N2
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    h = tl.arange(0, NH)
    n = r1[:, None] + N1 * h[None, :]  # the times of the first NH columns (all the signal)
    items = ((batch + 1) // 2 if PAIRED else batch) * channels
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        c, first, second, second_len = _rows_of(item, batch, channels, seq, PAIRED)
        are = _load_signal(x, pre, first, n, seq, seq, HAS_PRE, REVERSE)
        aim = are
        if PAIRED:
            aim = _load_signal(x, pre, second, n, seq, second_len, HAS_PRE, REVERSE)
        dre, dim = _whole_forward(are, aim, f1re, f1im, f2re, f2im, twre, twim, N1, N2, NH, PAIRED, PREC)
        k_off = tl.cast(c, tl.int64) * M
        sre, sim = _square(kre + k_off, r1, r2, N2), _square(kim + k_off, r1, r2, N2)
        hre, him = _whole_inverse(dre * sre - dim * sim, dre * sim + dim * sre, f1re, f1im, f2re, f2im, twre, twim,
                                  N1, N2, PREC)
        gre, gim = _square(f2re, r2, h, N2), _square(f2im, r2, h, N2)  # conj(F_N2)[:, :NH]
        out = _mm(hre, gre, PREC) + _mm(him, gim, PREC)
        _store_signal(y, z, post, first, n, seq, seq, out, HAS_POST, STORE_Z, REVERSE)
        if PAIRED:
            out = _mm(him, gre, PREC) - _mm(hre, gim, PREC)
            _store_signal(y, z, post, second, n, seq, second_len, out, HAS_POST, STORE_Z, REVERSE)


@triton.jit
def _whole_filter_grad_kernel(x, dy, pre, post, dk, f1re, f1im, f2re, f2im, twre, twim, batch, channels, seq,
                              taps, N1: tl.constexpr, N2: tl.constexpr, NH: tl.constexpr, NOUT: tl.constexpr,
                              HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, PREC: tl.constexpr):
    """Channel ``program_id(0)``: ``dk[c, p] = sum_b sum_t dz[b, c, t] w[b, c, t - p mod M]`` for ``p < taps``
    (``w = pre * x``, ``dz = post * dy``; ``dk [channels, taps]``), as ``ifft(sum_b conj(W) DZ)`` summed in
    registers over the batch; the inverse's last stage computes the columns ``n2 < NOUT`` (``taps <= N1 NOUT``)."""
    M: tl.constexpr = N1 * N2
    c = tl.program_id(0)
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    n = r1[:, None] + N1 * tl.arange(0, NH)[None, :]
    acc_re = tl.zeros([N1, N2], dtype=tl.float32)
    acc_im = tl.zeros([N1, N2], dtype=tl.float32)
    for b in range(0, batch):
        row = (tl.cast(b, tl.int64) * channels + c) * seq
        a = _load_signal(x, pre, row, n, seq, seq, HAS_PRE, False)
        xre, xim = _whole_forward(a, a, f1re, f1im, f2re, f2im, twre, twim, N1, N2, NH, False, PREC)
        g = _load_signal(dy, post, row, n, seq, seq, HAS_POST, False)
        gre, gim = _whole_forward(g, g, f1re, f1im, f2re, f2im, twre, twim, N1, N2, NH, False, PREC)
        acc_re += xre * gre + xim * gim
        acc_im += xre * gim - xim * gre
    hre, him = _whole_inverse(acc_re, acc_im, f1re, f1im, f2re, f2im, twre, twim, N1, N2, PREC)
    columns = tl.arange(0, NOUT)
    out = _mm(hre, _square(f2re, r2, columns, N2), PREC) + _mm(him, _square(f2im, r2, columns, N2), PREC)
    p = r1[:, None] + N1 * columns[None, :]
    tl.store(dk + tl.cast(c, tl.int64) * taps + p, out * (1.0 / M), mask=p < taps)


@triton.jit
def _digit_dft(twre, twim, rows, cols, D: tl.constexpr, M: tl.constexpr):
    """``F_D[rows, cols] = exp(-2 pi i rows cols / D)``, gathered from the length-``M`` twiddle table."""
    idx = ((rows[:, None] * cols[None, :]) % D) * (M // D)
    return tl.load(twre + idx), tl.load(twim + idx)


@triton.jit
def _twiddle(twre, twim, inner, k, SPAN: tl.constexpr, M: tl.constexpr):
    """``exp(-2 pi i inner k / SPAN)`` ``[rows, cols]`` (SPAN divides M)."""
    idx = ((inner[:, None] * k[None, :]) % SPAN) * (M // SPAN)
    return tl.load(twre + idx), tl.load(twim + idx)


@triton.jit
def _first_stage(x, gate, first, second, second_len, seq, sre, sim, twre, twim, M: tl.constexpr, D: tl.constexpr,
                 NIN: tl.constexpr, T: tl.constexpr, HAS_GATE: tl.constexpr, PAIRED: tl.constexpr,
                 REVERSE: tl.constexpr, PREC: tl.constexpr):
    """Stage 0 forward, from the signal: for each ``i < S = M / D``, the DFT over ``n_0 < NIN`` of ``x[n_0 S + i]``
    (the upper ``n_0`` are padding), times ``exp(-2 pi i i k_0 / M)``, to positions ``k_0 S + i``."""
    S: tl.constexpr = M // D
    BR: tl.constexpr = T // D
    n0 = tl.arange(0, NIN)
    k0 = tl.arange(0, D)
    fre, fim = _digit_dft(twre, twim, n0, k0, D, M)
    for block in range(0, S // BR):
        i = block * BR + tl.arange(0, BR)
        n = n0[None, :] * S + i[:, None]
        are = _load_signal(x, gate, first, n, seq, seq, HAS_GATE, REVERSE)
        if PAIRED:
            bre, bim = _cmm(are, _load_signal(x, gate, second, n, seq, second_len, HAS_GATE, REVERSE), fre, fim,
                            PREC)
        else:
            bre = _mm(are, fre, PREC)
            bim = _mm(are, fim, PREC)
        tre, tim = _twiddle(twre, twim, i, k0, M, M)
        p = k0[None, :] * S + i[:, None]
        tl.store(sre + p, bre * tre - bim * tim)
        tl.store(sim + p, bre * tim + bim * tre)
    tl.debug_barrier()


@triton.jit
def _stage(sre, sim, twre, twim, M: tl.constexpr, D: tl.constexpr, S: tl.constexpr, INVERSE: tl.constexpr,
           T: tl.constexpr, PREC: tl.constexpr):
    """One stage in place along the digit of width ``D`` and stride ``S``. Forward: the DFT along it, then the
    twiddle ``exp(-2 pi i i k / (D S))`` (``i`` the position below the digit). INVERSE (up to the factor ``D``):
    the conjugate twiddle, then ``@ conj(F_D)``."""
    BR: tl.constexpr = T // D
    k = tl.arange(0, D)
    fre, fim = _digit_dft(twre, twim, k, k, D, M)
    for block in range(0, (M // D) // BR):
        r = block * BR + tl.arange(0, BR)
        inner = r % S
        p = ((r // S) * (D * S) + inner)[:, None] + k[None, :] * S
        xre, xim = tl.load(sre + p), tl.load(sim + p)
        if INVERSE:
            if S > 1:
                tre, tim = _twiddle(twre, twim, inner, k, D * S, M)
                xre, xim = xre * tre + xim * tim, xim * tre - xre * tim
            yre, yim = _cmm_conj_right(xre, xim, fre, fim, PREC)
        else:
            yre, yim = _cmm(xre, xim, fre, fim, PREC)
            if S > 1:
                tre, tim = _twiddle(twre, twim, inner, k, D * S, M)
                yre, yim = yre * tre - yim * tim, yre * tim + yim * tre
        tl.store(sre + p, yre)
        tl.store(sim + p, yim)
    tl.debug_barrier()


@triton.jit
def _middle_stage(sre, sim, kre, kim, twre, twim, KEEP, M: tl.constexpr, D: tl.constexpr, CB: tl.constexpr,
                  T: tl.constexpr, PREC: tl.constexpr):
    """The last forward stage (stride 1, no twiddle), the product with the filter spectrum ``kre + i kim``
    (digit-reversed order) and the first inverse stage, by ``CB``-wide blocks of the frequency digit; a block whose
    bins ``f = low + P k`` (``P = M / D``) all lie in ``[KEEP, M - KEEP]`` is zero and skipped."""
    BR: tl.constexpr = T // D
    P: tl.constexpr = M // D
    n = tl.arange(0, D)
    for block in range(0, P // BR):
        r = block * BR + tl.arange(0, BR)
        p = r[:, None] * D + n[None, :]
        xre, xim = tl.load(sre + p), tl.load(sim + p)
        acc_re = tl.zeros([BR, D], dtype=tl.float32)
        acc_im = tl.zeros([BR, D], dtype=tl.float32)
        for j in range(0, D // CB):
            if (P * j * CB < KEEP) | (P * (j + 1) * CB - 1 > M - KEEP):
                k = j * CB + tl.arange(0, CB)
                fre, fim = _digit_dft(twre, twim, n, k, D, M)
                yre, yim = _cmm(xre, xim, fre, fim, PREC)
                q = r[:, None] * D + k[None, :]
                sre_k, sim_k = tl.load(kre + q), tl.load(kim + q)
                gre, gim = _digit_dft(twre, twim, k, n, D, M)
                ore, oim = _cmm_conj_right(yre * sre_k - yim * sim_k, yre * sim_k + yim * sre_k, gre, gim, PREC)
                acc_re += ore
                acc_im += oim
        tl.store(sre + p, acc_re)
        tl.store(sim + p, acc_im)
    tl.debug_barrier()


@triton.jit
def _last_stage(sre, sim, y, z, gate, first, second, second_len, seq, scale, twre, twim, M: tl.constexpr,
                D: tl.constexpr, NOUT: tl.constexpr, T: tl.constexpr, HAS_GATE: tl.constexpr,
                STORE_Z: tl.constexpr, PAIRED: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr):
    """Stage 0 inverse, to the signal: for each ``i < S = M / D``, conjugate twiddle, then the inverse DFT over
    ``k_0`` for the times ``n_0 < NOUT``; ``scale`` times the real part (and the imaginary one if PAIRED) stored
    at ``n_0 S + i`` (:func:`_store_signal`)."""
    S: tl.constexpr = M // D
    BR: tl.constexpr = T // D
    k0 = tl.arange(0, D)
    n0 = tl.arange(0, NOUT)
    fre, fim = _digit_dft(twre, twim, k0, n0, D, M)
    for block in range(0, S // BR):
        i = block * BR + tl.arange(0, BR)
        p = k0[None, :] * S + i[:, None]
        xre, xim = tl.load(sre + p), tl.load(sim + p)
        tre, tim = _twiddle(twre, twim, i, k0, M, M)
        xre, xim = xre * tre + xim * tim, xim * tre - xre * tim
        n = n0[None, :] * S + i[:, None]
        out = (_mm(xre, fre, PREC) + _mm(xim, fim, PREC)) * scale
        _store_signal(y, z, gate, first, n, seq, seq, out, HAS_GATE, STORE_Z, REVERSE)
        if PAIRED:
            out = (_mm(xim, fre, PREC) - _mm(xre, fim, PREC)) * scale
            _store_signal(y, z, gate, second, n, seq, second_len, out, HAS_GATE, STORE_Z, REVERSE)
    tl.debug_barrier()


@triton.jit
def _stages(sre, sim, twre, twim, M: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
            S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, LAST: tl.constexpr, INVERSE: tl.constexpr,
            T: tl.constexpr, PREC: tl.constexpr):
    """Forward stages 1 .. LAST in that order (digit ``D_s``, stride ``S_s``), or INVERSE ones LAST .. 1."""
    if INVERSE:
        if LAST >= 3:
            _stage(sre, sim, twre, twim, M, D3, S3, True, T, PREC)
        if LAST >= 2:
            _stage(sre, sim, twre, twim, M, D2, S2, True, T, PREC)
    if LAST >= 1:
        _stage(sre, sim, twre, twim, M, D1, S1, INVERSE, T, PREC)
    if not INVERSE:
        if LAST >= 2:
            _stage(sre, sim, twre, twim, M, D2, S2, False, T, PREC)
        if LAST >= 3:
            _stage(sre, sim, twre, twim, M, D3, S3, False, T, PREC)


@triton.jit
def _staged_conv_kernel(x, pre, post, y, z, kre, kim, twre, twim, scratch, batch, channels, seq, KEEP,
                        M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                        DL: tl.constexpr, NUM: tl.constexpr, NIN: tl.constexpr, CB: tl.constexpr, T: tl.constexpr,
                        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, STORE_Z: tl.constexpr, PAIRED: tl.constexpr,
                        REVERSE: tl.constexpr, PREC: tl.constexpr):
    """:func:`_whole_conv_kernel`'s op for ``M = D0 .. D_{NUM-1}`` (absent digits are 1; ``DL`` the last), the
    filter spectrum in digit-reversed order, through the program's scratch ``[2, M]``."""
    pid = tl.program_id(0)
    sre = scratch + pid.to(tl.int64) * 2 * M
    sim = sre + M
    S1: tl.constexpr = M // (D0 * D1)
    S2: tl.constexpr = S1 // D2
    S3: tl.constexpr = S2 // D3
    items = ((batch + 1) // 2 if PAIRED else batch) * channels
    for item in range(pid, items, tl.num_programs(0)):
        c, first, second, second_len = _rows_of(item, batch, channels, seq, PAIRED)
        _first_stage(x, pre, first, second, second_len, seq, sre, sim, twre, twim, M, D0, NIN, T, HAS_PRE, PAIRED,
                     REVERSE, PREC)
        _stages(sre, sim, twre, twim, M, D1, D2, D3, S1, S2, S3, NUM - 2, False, T, PREC)
        k_off = tl.cast(c, tl.int64) * M
        _middle_stage(sre, sim, kre + k_off, kim + k_off, twre, twim, KEEP, M, DL, CB, T, PREC)
        _stages(sre, sim, twre, twim, M, D1, D2, D3, S1, S2, S3, NUM - 2, True, T, PREC)
        _last_stage(sre, sim, y, z, post, first, second, second_len, seq, 1.0, twre, twim, M, D0, NIN, T, HAS_POST,
                    STORE_Z, PAIRED, REVERSE, PREC)


@triton.jit
def _staged_filter_grad_kernel(x, dy, pre, post, dk, twre, twim, scratch, batch, channels, seq, taps,
                               M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                               D3: tl.constexpr, NUM: tl.constexpr, NIN: tl.constexpr, NOUT: tl.constexpr,
                               T: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, PREC: tl.constexpr):
    """:func:`_whole_filter_grad_kernel`'s op for the staged digits, channels ``program_id(0) + j *
    num_programs(0)``, through the program's scratch ``[6, M]`` (the two transforms and the sum, re and im)."""
    pid = tl.program_id(0)
    are = scratch + pid.to(tl.int64) * 6 * M
    aim = are + M
    bre = aim + M
    bim = bre + M
    acc_re = bim + M
    acc_im = acc_re + M
    S1: tl.constexpr = M // (D0 * D1)
    S2: tl.constexpr = S1 // D2
    S3: tl.constexpr = S2 // D3
    BLOCK: tl.constexpr = T
    for c in range(pid, channels, tl.num_programs(0)):
        for start in range(0, M, BLOCK):
            q = start + tl.arange(0, BLOCK)
            tl.store(acc_re + q, tl.zeros([BLOCK], dtype=tl.float32))
            tl.store(acc_im + q, tl.zeros([BLOCK], dtype=tl.float32))
        for b in range(0, batch):
            row = (tl.cast(b, tl.int64) * channels + c) * seq
            _first_stage(x, pre, row, row, 0, seq, are, aim, twre, twim, M, D0, NIN, T, HAS_PRE, False, False,
                         PREC)
            _stages(are, aim, twre, twim, M, D1, D2, D3, S1, S2, S3, NUM - 1, False, T, PREC)
            _first_stage(dy, post, row, row, 0, seq, bre, bim, twre, twim, M, D0, NIN, T, HAS_POST, False,
                         False, PREC)
            _stages(bre, bim, twre, twim, M, D1, D2, D3, S1, S2, S3, NUM - 1, False, T, PREC)
            for start in range(0, M, BLOCK):
                q = start + tl.arange(0, BLOCK)
                ur, ui, gr, gi = tl.load(are + q), tl.load(aim + q), tl.load(bre + q), tl.load(bim + q)
                tl.store(acc_re + q, tl.load(acc_re + q) + ur * gr + ui * gi)
                tl.store(acc_im + q, tl.load(acc_im + q) + ur * gi - ui * gr)
            tl.debug_barrier()
        _stages(acc_re, acc_im, twre, twim, M, D1, D2, D3, S1, S2, S3, NUM - 1, True, T, PREC)
        _last_stage(acc_re, acc_im, dk, dk, dk, tl.cast(c, tl.int64) * taps, 0, 0, taps, 1.0 / M, twre, twim, M,
                    D0, NOUT, T, False, False, False, False, PREC)


def _num_warps(M: int) -> dict:
    return {} if _INTERPRETER else {"num_warps": 8 if M >= 2048 else 4}


def _programs(work: int, device: torch.device, per_sm: int, scratch_floats: int = 0) -> int:
    """Persistent programs for ``work`` items: every item under the interpreter; a few waves on a GPU, fewer when
    each needs ``scratch_floats`` fp32 of scratch (bounded by :data:`SCRATCH_BYTES`)."""
    if _INTERPRETER:
        return work
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = min(work, sms * per_sm)
    if scratch_floats:
        programs = min(programs, max(1, SCRATCH_BYTES // (4 * scratch_floats)))
    return programs


def _digit_args(M: int) -> dict:
    """The staged kernels' digit constexprs for ``M``."""
    digits = fft_digits(M)
    padded = digits + (1,) * (MAX_DIGITS - len(digits))
    return {"M": M, "D0": padded[0], "D1": padded[1], "D2": padded[2], "D3": padded[3], "NUM": len(digits),
            "NIN": _half(digits[0]), "T": min(M, TILE)}


def _launch(x: torch.Tensor, spectrum: tuple[torch.Tensor, torch.Tensor], keep: int, pre: torch.Tensor | None = None,
            post: torch.Tensor | None = None, store_z: bool = False, reverse: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = post * conv(pre * x)`` and, if ``store_z``, ``z = conv(pre * x)``, for ``x [batch, channels, seq]``
    (contiguous, like the gates) and the filter of ``spectrum`` (``fft(kt, M) / M`` re, im ``[channels, M]`` fp32, in
    the order of the path ``M`` takes); ``reverse``: every signal read and written time-reversed. ``keep``: bins
    ``keep <= k <= M - keep`` of the spectrum are zero (0: none known zero). Outputs in x's dtype."""
    batch, channels, seq = x.shape
    M = spectrum[0].shape[-1]
    y = _new_output(x.shape, x.dtype, x.device)
    z = _new_output(x.shape, x.dtype, x.device) if store_z else None
    paired = batch > 1
    items = (batch + 1) // 2 * channels if paired else batch * channels
    flags = {"HAS_PRE": pre is not None, "HAS_POST": post is not None, "STORE_Z": store_z, "PAIRED": paired,
             "REVERSE": reverse, "PREC": _PRECISION[x.dtype]}
    pre, post, z_arg = (y if t is None else t for t in (pre, post, z))  # absent: never read
    if M <= WHOLE_MAX_FFT:
        N1, N2 = _factors(M)
        programs = _programs(items, x.device, 8)
        _whole_conv_kernel[(programs,)](x, pre, post, y, z_arg, *spectrum, *_dft_matrices(M, x.device), batch,
                                        channels, seq, N1=N1, N2=N2, NH=_half(N2), **flags, **_num_warps(M))
        return y, z
    last = fft_digits(M)[-1]  # the frequency digit: whole, or in skippable MIN_DIGIT-wide blocks when sparse
    programs = _programs(items, x.device, 4, 2 * M)
    scratch = torch.empty((programs, 2, M), dtype=torch.float32, device=x.device)
    _staged_conv_kernel[(programs,)](x, pre, post, y, z_arg, *spectrum, *_twiddles(M, x.device), scratch, batch,
                                     channels, seq, keep if keep > 0 else M, DL=last,
                                     CB=min(MIN_DIGIT, last) if keep > 0 else last, **_digit_args(M), **flags,
                                     **_num_warps(M))
    return y, z


def _filter_grad(u: torch.Tensor, dy: torch.Tensor, M: int, taps: int, pre: torch.Tensor | None,
                 post: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``dkt [channels, taps]``: the gradient of the filter's first ``taps`` taps, ``ifft(sum_b conj(fft(pre *
    u)) fft(post * dy))[:, :taps]`` at ``M`` points."""
    batch, channels, seq = u.shape
    dk = _new_output((channels, taps), torch.float32, u.device)
    flags = {"HAS_PRE": pre is not None, "HAS_POST": post is not None, "PREC": _PRECISION[u.dtype]}
    pre, post = (dk if t is None else t for t in (pre, post))
    if M <= WHOLE_MAX_FFT:
        N1, N2 = _factors(M)
        _whole_filter_grad_kernel[(channels,)](u, dy, pre, post, dk, *_dft_matrices(M, u.device), batch, channels,
                                               seq, taps, N1=N1, N2=N2, NH=_half(N2),
                                               NOUT=_reached_columns(taps, N1, N2), **flags, **_num_warps(M))
        return dk
    D0 = fft_digits(M)[0]
    programs = _programs(channels, u.device, 2, 6 * M)
    scratch = torch.empty((programs, 6, M), dtype=torch.float32, device=u.device)
    _staged_filter_grad_kernel[(programs,)](u, dy, pre, post, dk, *_twiddles(M, u.device), scratch, batch, channels,
                                            seq, taps, NOUT=_reached_columns(taps, M // D0, D0), **_digit_args(M),
                                            **flags, **_num_warps(M))
    return dk


def _reached_columns(taps: int, stride: int, width: int) -> int:
    """Columns ``j < width`` of a last stage whose times ``i + stride * j`` (``i < stride``) cover ``n < taps``: a
    power of two, at least ``MIN_DIGIT`` (the ``tl.dot`` minimum)."""
    needed = -(-taps // stride)
    return min(width, max(MIN_DIGIT, 1 << (needed - 1).bit_length()))


def _filter_taps(k: torch.Tensor, L: int, seq: int, keep_frequencies: float | None, M: int) -> torch.Tensor:
    """The fp32 filter ``kt [channels, taps]`` whose circular convolution at ``M`` (zero-padded) is the op (module
    docstring): ``taps <= seq`` for dense filters, ``M`` for frequency-sparse ones; differentiable in ``k``."""
    taps = effective_kernel_len(L, seq)
    k = k[:, :taps].float()
    if keep_frequencies is None:
        return k
    n_fft = sparse_fft_size(seq)
    spectrum = torch.fft.rfft(k, n=n_fft)
    mask = torch.arange(spectrum.shape[-1], device=k.device) < kept_bins(keep_frequencies, n_fft)
    kt = torch.fft.irfft(spectrum * mask, n=n_fft)
    if M == n_fft:
        return kt
    causal, wrapped = kt[:, :seq], kt[:, n_fft - seq + 1:]
    middle = torch.zeros(k.shape[0], M - causal.shape[1] - wrapped.shape[1], dtype=kt.dtype, device=k.device)
    return torch.cat([causal, middle, wrapped], dim=1)


def _spectrum(kt: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fft(kt, M) / M`` as contiguous fp32 real and imaginary parts, in the order of the path ``M`` takes:
    natural for the registers' order 2, digit-reversed for the staged path."""
    spectrum = torch.fft.fft(kt.float(), n=M) / M
    if M > WHOLE_MAX_FFT:
        spectrum = spectrum[:, _digit_reversal(fft_digits(M), kt.device)]
    return spectrum.real.contiguous(), spectrum.imag.contiguous()


class _FFTConv(torch.autograd.Function):
    """``y = post * conv(pre * u, kt)`` (circular at ``M``, first ``seq`` samples; absent gates are 1) with the
    Triton kernels forward and backward (module docstring)."""

    @staticmethod
    def forward(ctx, u, kt, pre, post, M, keep):
        spectrum = _spectrum(kt, M)
        keeps_z = post is not None and ctx.needs_input_grad[3]
        y, z = _launch(u, spectrum, keep, pre, post, store_z=keeps_z)
        ctx.save_for_backward(u, pre, post, z, *spectrum)
        ctx.keep = keep
        ctx.M, ctx.taps = M, kt.shape[-1]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, pre, post, z, sre, sim = ctx.saved_tensors
        needs_u, needs_k, needs_pre, needs_post, _, _ = ctx.needs_input_grad
        dy = dy.contiguous().to(u.dtype)
        du = dkt = dpre = dpost = None
        if needs_u or needs_pre:
            du, dw = _launch(dy, (sre, sim), ctx.keep, pre=post, post=pre, store_z=needs_pre, reverse=True)
            if needs_pre:
                dpre = (dw.float() * u.float()).to(pre.dtype)
        if needs_k:
            dkt = _filter_grad(u, dy, ctx.M, ctx.taps, pre, post)
        if needs_post:
            dpost = (dy.float() * z.float()).to(post.dtype)
        return du if needs_u else None, dkt, dpre, dpost, None, None


def _check_triton_inputs(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"fft_conv_triton takes fp16, bf16 or fp32 {name}, got {tensor.dtype}; cast it, or use "
                            "backend='cpu' or 'reference' for float64.")


def fft_conv_triton(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None,
                    keep_frequencies: float | None = None, pre_gate: torch.Tensor | None = None,
                    post_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Causal long convolution ``y[b, c, t] = post[b, c, t] sum_{s <= min(t, L - 1)} k[c, s] (pre u)[b, c, t - s]``
    on Triton kernels, differentiable in ``u``, ``k`` and the gates (inputs checked by
    :func:`~.reference.check_inputs` and :func:`~.reference.check_gates`).

    Args:
        u: ``[batch, channels, seq]`` fp32, fp16 or bf16.
        k: ``[channels, taps]`` fp32, fp16 or bf16, on u's device.
        kernel_len: use the first ``kernel_len`` taps (partial convolution); None: all.
        keep_frequencies: keep the lowest ``ceil(f * (n_fft // 2 + 1))`` bins of the filter's spectrum at
            ``n_fft = 2 * next_power_of_two(seq)`` (frequency-sparse convolution); None: dense.
        pre_gate, post_gate: ``[batch, channels, seq]`` like u, or None: multiplied into the input before the
            convolution and into its output after it, in registers.

    Returns ``y [batch, channels, seq]`` in u's dtype.
    """
    L = check_inputs(u, k, kernel_len, keep_frequencies)
    check_gates(u, pre_gate, post_gate)
    _check_triton_inputs(u=u, k=k, pre_gate=pre_gate, post_gate=post_gate)
    seq = u.shape[-1]
    M = fft_size(seq)
    if M > WHOLE_MAX_FFT:
        fft_digits(M)  # refuses a transform too long for the kernels before any work
    keep = 0
    if keep_frequencies is not None and M == sparse_fft_size(seq):
        keep = kept_bins(keep_frequencies, M)
    kt = _filter_taps(k, L, seq, keep_frequencies, M)
    pre, post = (None if g is None else g.contiguous() for g in (pre_gate, post_gate))
    return _FFTConv.apply(u.contiguous(), kt, pre, post, M, keep)
