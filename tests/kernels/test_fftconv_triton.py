"""Triton FFT convolution (``hf_plugins.kernels.fftconv.triton``) against float64 oracles: forward and the gradients
of u and k, dense, partial (``kernel_len``) and frequency-sparse, in both tilings (whole tile in registers and
the blocked one with scratch memory).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` first), at
small shapes; tests marked ``gpu`` run the GPU tilings at training shapes.
"""

import pytest
import torch

from hf_plugins.kernels.fftconv import triton as fft_triton
from hf_plugins.kernels.fftconv.reference import fft_conv_spectral_reference
from hf_plugins.kernels.fftconv.triton import fft_conv_triton
from tests.kernels.poison import poisoned_output
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, **HALF}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(fft_triton, "_new_output", poisoned_output)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def blocked(monkeypatch):
    """Force the blocked tiling with 16-wide blocks (several blocks per Monarch dimension at small sizes), and the
    torch.fft filter gradient one channel at a time."""
    monkeypatch.setattr(fft_triton, "WHOLE_MAX_FFT", 0)
    monkeypatch.setattr(fft_triton, "BLOCK", 16)
    monkeypatch.setattr(fft_triton, "_TORCH_GRAD_ELEMENTS", 1)


def shifted_sum_oracle(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None) -> torch.Tensor:
    """The causal convolution by definition in float64: ``y[..., t] = sum_s k[:, s] u[..., t - s]``, one shifted
    slice per tap (differentiable)."""
    seq = u.shape[-1]
    taps = min(k.shape[1] if kernel_len is None else kernel_len, seq)
    u, k = u.double(), k.double()
    y = torch.zeros_like(u)
    for s in range(taps):
        y = y + torch.nn.functional.pad(u[..., :seq - s], (s, 0)) * k[None, :, s, None]
    return y


def conv_inputs(batch: int, channels: int, seq: int, taps: int, device="cpu", seed: int = 0):
    """Fresh random ``u [batch, channels, seq]``, a decaying filter ``k [channels, taps]`` (like Hyena's implicit
    filters: the output stays O(1) for any length) and an upstream gradient ``dy``, float64."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, seq, generator=generator, dtype=torch.float64)
    decay = torch.exp(-torch.arange(taps, dtype=torch.float64) / max(1.0, taps / 4))
    k = torch.randn(channels, taps, generator=generator, dtype=torch.float64) * decay / taps ** 0.5
    dy = torch.randn(batch, channels, seq, generator=generator, dtype=torch.float64)
    return u.to(device), k.to(device), dy.to(device)


def forward_backward(fn, u, k, dy, dtype, **kwargs) -> dict[str, torch.Tensor]:
    """``fn`` on ``u, k`` cast to ``dtype``: the output and the gradients of u and k for the upstream ``dy``."""
    u = u.to(dtype).requires_grad_()
    k = k.to(dtype).requires_grad_()
    y = fn(u, k, **kwargs)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "du": u.grad, "dk": k.grad}


def oracle(u, k, dy, dtype, kernel_len=None, keep_frequencies=None) -> dict[str, torch.Tensor]:
    """Float64 forward and gradients on the inputs rounded to ``dtype`` (the kernel's own inputs)."""
    u, k, dy = (x.to(dtype).double() for x in (u, k, dy))
    if keep_frequencies is None and u.shape[-1] <= 1024:  # one slice per tap: longer inputs take float64 torch.fft
        fn = lambda a, b: shifted_sum_oracle(a, b, kernel_len)  # noqa: E731
    else:
        fn = lambda a, b: fft_conv_spectral_reference(a, b, kernel_len, keep_frequencies)  # noqa: E731
    return forward_backward(fn, u, k, dy, torch.float64)


def assert_all_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    for name, value in actual.items():
        assert torch.isfinite(value).all(), f"{name} has non-finite values (poisoned output not overwritten?)"
        assert value.shape == expected[name].shape, name
        error = max_rel_error(value, expected[name])
        assert error <= FLOAT_KERNEL_RTOL[dtype], f"{name}: max rel error {error:.3e} > {FLOAT_KERNEL_RTOL[dtype]}"


LENGTHS = [1, 7, 64, 1000, 4096]
KERNELS = {"short": lambda n: max(1, n // 3), "equal": lambda n: n, "long": lambda n: n + 5}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda name: f"taps-{name}")
@pytest.mark.parametrize("N", LENGTHS, ids=lambda n: f"N{n}")
def test_forward_and_gradients_match_the_direct_convolution(N, kernel):
    batch, channels = (1, 2) if N >= 4096 else (2, 3)
    u, k, dy = conv_inputs(batch, channels, N, KERNELS[kernel](N), seed=N)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32)
    assert actual["y"].dtype == torch.float32 and actual["dk"].dtype == torch.float32
    assert_all_close(actual, oracle(u, k, dy, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N", [64, 1000], ids=lambda n: f"N{n}")
def test_dtypes(N, dtype):
    u, k, dy = conv_inputs(2, 3, N, N, seed=N + 1)
    actual = forward_backward(fft_conv_triton, u, k, dy, dtype)
    assert actual["y"].dtype == dtype and actual["du"].dtype == dtype and actual["dk"].dtype == dtype
    assert_all_close(actual, oracle(u, k, dy, dtype), dtype)


@pytest.mark.parametrize(("N", "taps", "kernel_len"), [(7, 7, 3), (300, 400, 1), (1000, 1000, 257), (64, 80, 70)],
                         ids=lambda x: str(x))
def test_partial_convolution_uses_the_first_kernel_len_taps(N, taps, kernel_len):
    u, k, dy = conv_inputs(2, 3, N, taps, seed=taps)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, kernel_len=kernel_len)
    expected = oracle(u, k, dy, torch.float32, kernel_len=kernel_len)
    assert_all_close(actual, expected, torch.float32)
    assert (actual["dk"][:, kernel_len:] == 0).all()


@pytest.mark.parametrize("keep", [0.01, 0.25, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize(("N", "taps"), [(7, 5), (100, 300), (1000, 1000)], ids=lambda x: str(x))
def test_frequency_sparse_matches_the_spectral_definition(N, taps, keep):
    u, k, dy = conv_inputs(2, 3, N, taps, seed=N + taps)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, keep_frequencies=keep), torch.float32)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_frequency_sparse_partial_half_precision(dtype):
    u, k, dy = conv_inputs(2, 3, 500, 600, seed=7)
    actual = forward_backward(fft_conv_triton, u, k, dy, dtype, kernel_len=400, keep_frequencies=0.3)
    assert_all_close(actual, oracle(u, k, dy, dtype, kernel_len=400, keep_frequencies=0.3), dtype)


@pytest.mark.parametrize(("N", "taps", "keep"), [(7, 7, None), (1000, 900, None), (1000, 1000, 0.1),
                                                 (2048, 2048, 0.1), (2048, 300, 0.6)], ids=lambda x: str(x))
def test_blocked_tiling(blocked, N, taps, keep):
    # 2048 -> M = 4096 = 64 x 64 in 16-wide blocks: 4 x 4 blocks per stage; keep 0.1 skips the two middle row
    # blocks of the spectrum (bins 1024..3071 are zero), keep 0.6 none
    batch, channels = (1, 1) if N >= 2048 else (2, 2)
    u, k, dy = conv_inputs(batch, channels, N, taps, seed=N + taps)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, keep_frequencies=keep), torch.float32)


def test_blocked_tiling_half_precision(blocked):
    u, k, dy = conv_inputs(2, 2, 300, 300, seed=9)
    for dtype in HALF.values():
        assert_all_close(forward_backward(fft_conv_triton, u, k, dy, dtype), oracle(u, k, dy, dtype), dtype)


def test_non_contiguous_input_and_gradient_of_u_only():
    u, k, dy = conv_inputs(3, 2, 50, 20, seed=11)
    u_view = u.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    y = fft_conv_triton(u_view, k.float())
    y.backward(dy.float())
    expected = oracle(u, k, dy, torch.float32)
    assert max_rel_error(y, expected["y"]) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert max_rel_error(u_view.grad, expected["du"]) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_float64_inputs_are_refused_with_the_alternative():
    with pytest.raises(TypeError, match="fft_conv_triton takes fp16, bf16 or fp32 u, got torch.float64"):
        fft_conv_triton(torch.zeros(1, 2, 8, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [None, 0.25], ids=["dense", "keep0.25"])
def test_gpu_bf16_at_training_shapes(keep):
    # N = 16384 -> M = 32768: the blocked tiling (128 x 256 in 64-wide blocks)
    u, k, dy = conv_inputs(4, 64, 16384, 16384, device="cuda", seed=1)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.bfloat16, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.bfloat16, keep_frequencies=keep), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N", [1, 200, 1000, 2048, 4096, 8191], ids=lambda n: f"N{n}")
def test_gpu_both_tilings_and_dtypes(N, dtype):
    u, k, dy = conv_inputs(4, 64, N, N, device="cuda", seed=N)
    assert_all_close(forward_backward(fft_conv_triton, u, k, dy, dtype), oracle(u, k, dy, dtype), dtype)
