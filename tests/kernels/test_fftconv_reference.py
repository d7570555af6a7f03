"""The long-convolution oracles (``hf_plugins.kernels.fftconv.reference``) against a tap-by-tap loop and numpy's
FFT, and the input checks every backend shares.

Also home of the case helpers the cpu and triton tests share (:func:`conv_inputs`, :func:`forward_backward`,
:func:`oracle`).
"""

import math

import numpy as np
import pytest
import torch

from hf_plugins.kernels.fftconv import fft_conv
from hf_plugins.kernels.fftconv.reference import (
    fft_conv_direct_reference,
    fft_conv_spectral_reference,
    kept_bins,
    next_power_of_two,
    sparse_fft_size,
)
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_inputs(batch: int, channels: int, seq: int, taps: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh float64 ``u [batch, channels, seq]``, ``k [channels, taps]`` (decaying like a Hyena filter, so late
    taps matter less but not nothing) and the upstream gradient ``dy`` (like ``u``)."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(taps, dtype=torch.float64) / max(taps / 4, 1.0))
    return {
        "u": torch.randn(batch, channels, seq, generator=gen, dtype=torch.float64),
        "k": torch.randn(channels, taps, generator=gen, dtype=torch.float64) * (0.1 + decay),
        "dy": torch.randn(batch, channels, seq, generator=gen, dtype=torch.float64),
    }


def forward_backward(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``fn(u, k) -> y`` on the inputs cast to ``dtype`` -> ``{"y", "du", "dk"}`` (``d sum(y * dy)``)."""
    u = inputs["u"].to(dtype).requires_grad_()
    k = inputs["k"].to(dtype).requires_grad_()
    y = fn(u, k)
    (y.double() * inputs["dy"]).sum().backward()
    return {"y": y.detach(), "du": u.grad, "dk": k.grad}


def oracle(inputs: dict[str, torch.Tensor], dtype: torch.dtype, kernel_len: int | None = None,
           keep_frequencies: float | None = None) -> dict[str, torch.Tensor]:
    """The float64 reference (direct when dense, spectral when sparse) on the inputs rounded to ``dtype``."""
    rounded = {name: value.to(dtype).double() for name, value in inputs.items()}
    if keep_frequencies is None:
        return forward_backward(lambda u, k: fft_conv_direct_reference(u, k, kernel_len), rounded, torch.float64)
    return forward_backward(lambda u, k: fft_conv_spectral_reference(u, k, kernel_len, keep_frequencies), rounded,
                            torch.float64)


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every entry within the tolerance table's relative error for ``dtype``, and finite."""
    for name, value in expected.items():
        assert torch.isfinite(actual[name]).all(), f"{name} has non-finite values"
        err = max_rel_error(actual[name], value)
        assert err <= FLOAT_KERNEL_RTOL[dtype], f"{name}: max rel error {err:.3e} > {FLOAT_KERNEL_RTOL[dtype]:.1e}"


def loop_convolution(u: torch.Tensor, k: torch.Tensor, kernel_len: int) -> torch.Tensor:
    """The definition, one tap at a time: ``y[..., t] += k[:, s] * u[..., t - s]`` for ``s < kernel_len``."""
    y = torch.zeros_like(u)
    for s in range(min(kernel_len, u.shape[-1])):
        y[..., s:] += k[:, s, None] * u[..., :u.shape[-1] - s]
    return y


def numpy_sparse_convolution(u: torch.Tensor, k: torch.Tensor, kernel_len: int, keep: float) -> np.ndarray:
    """The frequency-sparse definition, written again with numpy's FFT."""
    seq = u.shape[-1]
    n_fft = 2 ** math.ceil(math.log2(seq)) * 2
    spectrum = np.fft.rfft(k[:, :min(kernel_len, seq)].numpy(), n=n_fft)
    spectrum[:, math.ceil(keep * (n_fft // 2 + 1)):] = 0
    return np.fft.irfft(np.fft.rfft(u.numpy(), n=n_fft) * spectrum, n=n_fft)[..., :seq]


LENGTHS = [1, 7, 64, 1000, 4096]


@pytest.mark.parametrize("taps", ["1", "half", "equal", "longer"])
@pytest.mark.parametrize("N", LENGTHS, ids=lambda n: f"N{n}")
def test_direct_reference_is_the_tap_loop(N, taps):
    taps = {"1": 1, "half": max(N // 2, 1), "equal": N, "longer": 2 * N + 3}[taps]
    inputs = conv_inputs(2, 3, N, taps, seed=N + taps)
    expected = loop_convolution(inputs["u"], inputs["k"], taps)
    assert max_rel_error(fft_conv_direct_reference(inputs["u"], inputs["k"]), expected) <= 1e-14


@pytest.mark.parametrize("kernel_len", [1, 5, 40], ids=lambda n: f"L{n}")
def test_direct_reference_partial_uses_the_first_taps(kernel_len):
    inputs = conv_inputs(2, 3, 50, 40, seed=kernel_len)
    got = fft_conv_direct_reference(inputs["u"], inputs["k"], kernel_len)
    assert max_rel_error(got, loop_convolution(inputs["u"], inputs["k"], kernel_len)) <= 1e-14
    assert max_rel_error(got, fft_conv_direct_reference(inputs["u"], inputs["k"][:, :kernel_len])) == 0


@pytest.mark.parametrize("taps", ["half", "equal", "longer"])
@pytest.mark.parametrize("N", LENGTHS + [16384], ids=lambda n: f"N{n}")
def test_dense_spectral_reference_equals_the_direct_one(N, taps):
    taps = {"half": max(N // 2, 1), "equal": N, "longer": 2 * N + 3}[taps]
    channels = 1 if N > 4096 else 3
    inputs = conv_inputs(1, channels, N, taps, seed=N + taps)
    got = fft_conv_spectral_reference(inputs["u"], inputs["k"])
    assert max_rel_error(got, fft_conv_direct_reference(inputs["u"], inputs["k"])) <= FLOAT_KERNEL_RTOL[torch.float64]


@pytest.mark.parametrize("keep", [0.05, 0.25, 0.5, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize(("N", "kernel_len"), [(1, 1), (7, 3), (64, 64), (1000, 600), (4096, 4096)], ids=str)
def test_sparse_spectral_reference_matches_numpy(N, kernel_len, keep):
    inputs = conv_inputs(2, 3, N, N + 5, seed=N)
    got = fft_conv_spectral_reference(inputs["u"], inputs["k"], kernel_len, keep)
    expected = torch.from_numpy(numpy_sparse_convolution(inputs["u"], inputs["k"], kernel_len, keep))
    assert max_rel_error(got, expected) <= FLOAT_KERNEL_RTOL[torch.float64]


def test_sparse_keeping_every_bin_is_the_dense_convolution():
    inputs = conv_inputs(2, 3, 300, 200, seed=1)
    got = fft_conv_spectral_reference(inputs["u"], inputs["k"], keep_frequencies=1.0)
    assert max_rel_error(got, fft_conv_direct_reference(inputs["u"], inputs["k"])) <= FLOAT_KERNEL_RTOL[torch.float64]


def test_sparse_drops_the_high_frequencies():
    # an alternating filter lives in the top bin: keeping the lowest half leaves (almost) nothing of it
    u = torch.randn(1, 1, 256, dtype=torch.float64)
    k = torch.tensor([[1.0, -1.0] * 128], dtype=torch.float64)
    sparse = fft_conv_spectral_reference(u, k, keep_frequencies=0.5)
    assert sparse.abs().max() < 0.05 * fft_conv_direct_reference(u, k).abs().max()


@pytest.mark.parametrize(("seq", "n_fft"), [(1, 2), (2, 4), (3, 8), (1000, 2048), (1024, 2048), (1025, 4096)])
def test_sparse_fft_size_is_twice_the_next_power_of_two(seq, n_fft):
    assert sparse_fft_size(seq) == n_fft == 2 * next_power_of_two(seq)


@pytest.mark.parametrize(("keep", "n_fft", "bins"), [(0.25, 32768, 4097), (1.0, 8, 5), (0.01, 8, 1), (0.5, 2048, 513)])
def test_kept_bins_rounds_up(keep, n_fft, bins):
    assert kept_bins(keep, n_fft) == bins


@pytest.mark.parametrize("kind", ["direct", "spectral", "sparse"])
def test_reference_gradients_pass_gradcheck(kind):
    inputs = conv_inputs(2, 2, 9, 6, seed=3)
    fn = {"direct": lambda u, k: fft_conv_direct_reference(u, k, 4),
          "spectral": lambda u, k: fft_conv_spectral_reference(u, k, 4),
          "sparse": lambda u, k: fft_conv_spectral_reference(u, k, 4, 0.4)}[kind]
    assert torch.autograd.gradcheck(fn, (inputs["u"].requires_grad_(), inputs["k"].requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("keep", [None, 0.5], ids=["dense", "sparse"])
def test_reference_backend_returns_u_dtype(dtype, keep):
    inputs = conv_inputs(2, 3, 20, 10, seed=4)
    y = fft_conv(inputs["u"].to(dtype), inputs["k"].float(), keep_frequencies=keep, backend="reference")
    assert y.dtype == dtype and y.shape == (2, 3, 20)
    expected = oracle(inputs, dtype, keep_frequencies=keep)["y"]
    assert max_rel_error(y, expected) <= FLOAT_KERNEL_RTOL[dtype]


BAD_CALLS = {
    "u_not_tensor": (lambda u, k: ([[1.0]], k, {}), TypeError, "u must be a torch.Tensor"),
    "u_integer": (lambda u, k: (u.long(), k, {}), TypeError, "u must be a floating-point tensor, got torch.int64"),
    "k_integer": (lambda u, k: (u, k.int(), {}), TypeError, "k must be a floating-point tensor, got torch.int32"),
    "u_2d": (lambda u, k: (u[0], k, {}), ValueError, r"u must be a 3-D tensor \[batch, channels, seq\]"),
    "k_3d": (lambda u, k: (u, k[None], {}), ValueError, r"k must be a 2-D tensor \[channels, taps\]"),
    "empty_seq": (lambda u, k: (u[..., :0], k, {}), ValueError, r"no empty size, got shape \(2, 3, 0\)"),
    "empty_batch": (lambda u, k: (u[:0], k, {}), ValueError, r"no empty size, got shape \(0, 3, 10\)"),
    "channels": (lambda u, k: (u, k[:2], {}), ValueError, r"\(2 != 3 channels\)"),
    "kernel_len_0": (lambda u, k: (u, k, {"kernel_len": 0}), ValueError, r"kernel_len must be in \[1, taps=8\]"),
    "kernel_len_long": (lambda u, k: (u, k, {"kernel_len": 9}), ValueError, r"got 9; pass a longer k"),
    "kernel_len_float": (lambda u, k: (u, k, {"kernel_len": 4.0}), TypeError, "kernel_len must be an int or None"),
    "keep_0": (lambda u, k: (u, k, {"keep_frequencies": 0.0}), ValueError, r"keep_frequencies must be in \(0, 1\]"),
    "keep_big": (lambda u, k: (u, k, {"keep_frequencies": 1.5}), ValueError, r"got 1.5"),
    "keep_str": (lambda u, k: (u, k, {"keep_frequencies": "0.5"}), TypeError, "keep_frequencies must be a float"),
    "backend": (lambda u, k: (u, k, {"backend": "cuda"}), ValueError, "backend must be one of"),
    "pre_gate_shape": (lambda u, k: (u, k, {"pre_gate": u[:, :1]}), ValueError,
                       r"pre_gate must have u's shape \[2, 3, 10\] \[batch, channels, seq\], got \[2, 1, 10\]"),
    "post_gate_integer": (lambda u, k: (u, k, {"post_gate": u.long()}), TypeError,
                          "post_gate must be a floating-point tensor like u or None, got torch.int64"),
    "pre_gate_list": (lambda u, k: (u, k, {"pre_gate": [1.0]}), TypeError, "pre_gate must be .* got list"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_calls_raise_clear_errors(case, backend):
    make, error, message = BAD_CALLS[case]
    u, k, kwargs = make(torch.randn(2, 3, 10), torch.randn(3, 8))
    with pytest.raises(error, match=message):
        fft_conv(u, k, **{"backend": backend, **kwargs})
