"""The CPU long convolution (``hf_plugins.kernels.fftconv.cpu``) against the float64 oracles: outputs and the
gradients of u and k, dense, partial and frequency-sparse, both routes (FFT and short-filter ``F.conv1d``), and
the filter-spectrum cache.

The CPU path allocates nothing for a kernel to fill (every tensor comes out of a torch op), so there is no
output buffer to poison; the checks assert finiteness instead.
"""

import gc

import pytest
import torch

from hf_plugins.kernels.fftconv import fft_conv
from hf_plugins.kernels.fftconv.cpu import (
    DIRECT_MAX_TAPS,
    DIRECT_MAX_TAPS_GRAD,
    SPECTRUM_CACHE,
    KernelSpectrumCache,
    dense_fft_size,
    fast_fft_size,
    fft_conv_cpu,
)
from hf_plugins.kernels.fftconv.reference import fft_conv_spectral_reference
from tests.kernels.test_fftconv_reference import assert_all_close, conv_inputs, forward_backward, oracle
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

ROUTES = {"auto": None, "fft": 0, "direct": 1 << 30}


pytestmark = pytest.mark.usefixtures("one_thread")


def cpu_fn(kernel_len: int | None = None, keep: float | None = None, route: str = "auto", cache=None):
    """``fft_conv_cpu`` as ``(u, k) -> y`` with all taps by default, on a fresh cache unless one is given."""
    cache = KernelSpectrumCache() if cache is None else cache
    return lambda u, k: fft_conv_cpu(u, k, k.shape[1] if kernel_len is None else kernel_len, keep, cache,
                                     ROUTES[route])


def batch_channels(seq: int) -> tuple[int, int]:
    """Small ``batch * channels`` at long lengths so the float64 direct oracle stays fast."""
    return (2, 3) if seq <= 1000 else (1, 2) if seq <= 4096 else (1, 1)


def taps_for(kind: str, seq: int) -> int:
    return {"short": min(5, seq), "half": max(seq // 2, 1), "equal": seq, "longer": 2 * seq + 3}[kind]


@pytest.mark.parametrize("route", ["auto", "fft"])
@pytest.mark.parametrize("taps", ["short", "half", "equal", "longer"])
@pytest.mark.parametrize("N", [1, 7, 64, 1000, 4096, 16384], ids=lambda n: f"N{n}")
def test_dense_matches_the_direct_oracle_forward_and_backward(N, taps, route):
    if N == 16384 and (taps == "longer" or (route == "fft" and taps != "short")):
        pytest.skip("the float64 oracle is slow here: 'longer' cuts to 'equal', and 'auto' takes the FFT already")
    inputs = conv_inputs(*batch_channels(N), N, taps_for(taps, N), seed=N + len(taps))
    actual = forward_backward(cpu_fn(route=route), inputs, torch.float32)
    assert actual["y"].dtype == torch.float32 and actual["y"].shape == inputs["u"].shape
    assert_all_close(actual, oracle(inputs, torch.float32), torch.float32)


@pytest.mark.parametrize("route", ["fft", "direct"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N", [7, 1000], ids=lambda n: f"N{n}")
def test_half_precision_inputs_compute_in_float32(N, dtype, route):
    inputs = conv_inputs(2, 3, N, N, seed=N)
    actual = forward_backward(cpu_fn(route=route), inputs, dtype)
    assert actual["y"].dtype == dtype and actual["du"].dtype == dtype and actual["dk"].dtype == dtype
    assert_all_close(actual, oracle(inputs, dtype), dtype)


def test_half_precision_input_with_a_float32_filter():
    # FlashFFTConv's convention: activations in bf16, the filter in fp32
    inputs = conv_inputs(2, 3, 300, 300, seed=2)
    u, k = inputs["u"].bfloat16(), inputs["k"].float()
    y = fft_conv(u, k, backend="cpu")
    assert y.dtype == torch.bfloat16
    assert max_rel_error(y, fft_conv(u.double(), k.double(), backend="reference")) <= FLOAT_KERNEL_RTOL[torch.bfloat16]


@pytest.mark.parametrize("route", ["fft", "direct"])
def test_float64_inputs_compute_in_float64(route):
    inputs = conv_inputs(2, 3, 500, 400, seed=5)
    actual = forward_backward(cpu_fn(route=route), inputs, torch.float64)
    assert_all_close(actual, oracle(inputs, torch.float64), torch.float64)


@pytest.mark.parametrize("route", ["fft", "direct"])
@pytest.mark.parametrize(("N", "taps", "kernel_len"), [(64, 64, 1), (1000, 1000, 37), (1000, 2048, 1500),
                                                       (4096, 4096, 1024)], ids=str)
def test_partial_convolution_matches_its_oracle(N, taps, kernel_len, route):
    inputs = conv_inputs(*batch_channels(N), N, taps, seed=kernel_len)
    actual = forward_backward(cpu_fn(kernel_len, route=route), inputs, torch.float32)
    expected = oracle(inputs, torch.float32, kernel_len)
    assert_all_close(actual, expected, torch.float32)
    assert (actual["dk"][:, kernel_len:] == 0).all(), "taps past kernel_len must get no gradient"


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize(("N", "kernel_len"), [(1, 1), (7, 7), (64, 20), (1000, 1000), (4096, 3000),
                                               (16384, 16384)], ids=str)
def test_frequency_sparse_matches_the_spectral_oracle(N, kernel_len, keep):
    inputs = conv_inputs(*batch_channels(N), N, N, seed=N)
    actual = forward_backward(cpu_fn(kernel_len, keep), inputs, torch.float32)
    assert_all_close(actual, oracle(inputs, torch.float32, kernel_len, keep), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_frequency_sparse_half_precision(dtype):
    inputs = conv_inputs(2, 3, 700, 700, seed=9)
    actual = forward_backward(cpu_fn(keep=0.3), inputs, dtype)
    assert_all_close(actual, oracle(inputs, dtype, keep_frequencies=0.3), dtype)


@pytest.mark.parametrize("n", [1, 2, 7, 17, 100, 1025, 4097, 16415, 32769, 100001])
def test_fast_fft_size_is_the_smallest_even_5_smooth_size_at_least_n(n):
    def smooth(m: int) -> bool:
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    size = fast_fft_size(n)
    assert size >= n and size % 2 == 0 and smooth(size)
    assert not any(smooth(m) for m in range(n + n % 2, size, 2))


@pytest.mark.parametrize(("seq", "taps", "size"), [(1000, 1000, 2000), (4096, 33, 4320), (16384, 16384, 32768)])
def test_dense_fft_size_holds_the_causal_linear_convolution(seq, taps, size):
    assert dense_fft_size(seq, taps) == size


@pytest.mark.parametrize("keep", [None, 0.25], ids=["dense", "sparse"])
def test_spectrum_is_cached_in_no_grad_and_invalidated_by_in_place_updates(keep):
    cache = KernelSpectrumCache()
    inputs = conv_inputs(2, 3, 300, 200, seed=6)
    u, k = inputs["u"].float(), inputs["k"].float()
    with torch.no_grad():
        first = fft_conv_cpu(u, k, 200, keep, cache)
        second = fft_conv_cpu(u, k, 200, keep, cache)
        assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
        assert torch.equal(first, second)
        k.mul_(-2.0)  # bumps k._version: the cached spectrum is stale
        third = fft_conv_cpu(u, k, 200, keep, cache)
    assert (cache.hits, cache.misses) == (1, 2)
    assert max_rel_error(third, -2.0 * first) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_spectrum_cache_keys_on_the_geometry():
    cache = KernelSpectrumCache()
    u, k = torch.randn(1, 2, 100), torch.randn(2, 100)
    with torch.no_grad():
        for kernel_len, keep in [(100, None), (60, None), (100, 0.5), (100, None), (60, None), (100, 0.5)]:
            fft_conv_cpu(u, k, kernel_len, keep, cache)
        fft_conv_cpu(u[..., :50], k, 100, None, cache)  # another seq: another FFT size
    assert (cache.hits, cache.misses) == (3, 4)


def test_spectrum_is_not_cached_when_k_needs_a_gradient():
    cache = KernelSpectrumCache()
    inputs = conv_inputs(2, 3, 300, 300, seed=7)
    for _ in range(2):
        actual = forward_backward(cpu_fn(cache=cache), inputs, torch.float32)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
    assert_all_close(actual, oracle(inputs, torch.float32), torch.float32)


def test_cached_spectrum_still_passes_gradients_to_u():
    cache = KernelSpectrumCache()
    inputs = conv_inputs(2, 3, 300, 300, seed=8)
    k = inputs["k"].float()  # no requires_grad: a frozen filter
    for _ in range(2):
        u = inputs["u"].float().requires_grad_()
        (fft_conv_cpu(u, k, 300, None, cache).double() * inputs["dy"]).sum().backward()
    assert (cache.hits, cache.misses) == (1, 1)
    assert max_rel_error(u.grad, oracle(inputs, torch.float32)["du"]) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_cache_entries_go_with_their_filter_and_beyond_max_entries():
    cache = KernelSpectrumCache(max_entries=2)
    u = torch.randn(1, 2, 100)
    kernels = [torch.randn(2, 100) for _ in range(3)]
    with torch.no_grad():
        for k in kernels:
            fft_conv_cpu(u, k, 100, None, cache)
        assert len(cache) == 2
        fft_conv_cpu(u, kernels[0], 100, None, cache)  # the least recently used was evicted
    assert (cache.hits, cache.misses) == (0, 4)
    del kernels, k
    gc.collect()
    assert len(cache) == 0


def test_inference_mode_tensors_bypass_the_cache():
    cache = KernelSpectrumCache()
    with torch.inference_mode():
        u, k = torch.randn(1, 2, 100), torch.randn(2, 100)
        y = fft_conv_cpu(u, k, 100, None, cache)
    assert (cache.hits, cache.misses) == (0, 0)
    assert max_rel_error(y, fft_conv(u.double(), k.double(), backend="reference")) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_dispatch_runs_every_cpu_backend_on_the_same_numbers():
    inputs = conv_inputs(2, 3, 500, 500, seed=10)
    u, k = inputs["u"].float(), inputs["k"].float()
    for keep in (None, 0.5):
        expected = fft_conv(u, k, keep_frequencies=keep, backend="reference")
        for backend in (None, "cpu"):
            got = fft_conv(u, k, keep_frequencies=keep, backend=backend)
            assert max_rel_error(got, expected) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("keep", [None, 0.5], ids=["dense", "keep0.5"])
def test_gates_multiply_the_input_and_the_output_with_gradients(keep):
    inputs = conv_inputs(3, 2, 300, 300, seed=12)
    generator = torch.Generator().manual_seed(12)
    pre, post = (torch.randn(3, 2, 300, generator=generator, dtype=torch.float64) for _ in range(2))
    leaves = {name: value.clone().requires_grad_() for name, value in
              (("u", inputs["u"]), ("k", inputs["k"]), ("pre", pre), ("post", post))}
    expected = fft_conv_spectral_reference(leaves["u"] * leaves["pre"], leaves["k"], None, keep) * leaves["post"]
    expected.backward(inputs["dy"])
    floats = {name: value.detach().float().requires_grad_() for name, value in leaves.items()}
    got = fft_conv(floats["u"], floats["k"], keep_frequencies=keep, backend="cpu", pre_gate=floats["pre"],
                   post_gate=floats["post"])
    got.backward(inputs["dy"].float())
    assert got.dtype == torch.float32
    assert max_rel_error(got, expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    for name in leaves:
        assert max_rel_error(floats[name].grad, leaves[name].grad) <= FLOAT_KERNEL_RTOL[torch.float32], name


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("taps", [DIRECT_MAX_TAPS_GRAD, DIRECT_MAX_TAPS_GRAD + 1, DIRECT_MAX_TAPS, DIRECT_MAX_TAPS + 1],
                         ids=lambda n: f"L{n}")
def test_auto_route_takes_conv1d_for_short_filters(taps, grad):
    # only the FFT route looks the (frozen) filter up in the cache
    cache = KernelSpectrumCache()
    u, k = torch.randn(1, 2, 200, requires_grad=grad), torch.randn(2, taps)
    fft_conv_cpu(u, k, taps, None, cache)
    assert cache.misses == int(taps > (DIRECT_MAX_TAPS_GRAD if grad else DIRECT_MAX_TAPS))


def test_default_cache_serves_the_public_op():
    k = torch.randn(3, 400)
    u = torch.randn(2, 3, 400)
    with torch.no_grad():
        fft_conv(u, k)
        hits = SPECTRUM_CACHE.hits
        fft_conv(u, k)
    assert SPECTRUM_CACHE.hits == hits + 1


@pytest.mark.parametrize("keep", [None, 0.5], ids=["dense", "sparse"])
def test_sequence_first_activations_transposed_in_place(keep):
    # a model's [batch, seq, channels] activations arrive as a strided [batch, channels, seq] view
    inputs = conv_inputs(2, 4, 300, 300, seed=11)
    u = inputs["u"].float().transpose(1, 2).contiguous().transpose(1, 2)
    y = fft_conv(u, inputs["k"].float(), keep_frequencies=keep)
    assert y.is_contiguous()
    expected = oracle(inputs, torch.float32, keep_frequencies=keep)["y"]
    assert max_rel_error(y, expected) <= FLOAT_KERNEL_RTOL[torch.float32]
