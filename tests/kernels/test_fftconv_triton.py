"""Triton FFT convolution (``hf_plugins.kernels.fftconv.triton``) against float64 oracles: forward and the gradients
of u, k and the gates, dense, partial (``kernel_len``), frequency-sparse and gated, in both paths (order 2 in
registers, the staged orders 2-4 through scratch memory), with paired and lone batch rows.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` first), at
small shapes (narrow digits reach orders 3 and 4 there); the kernels are also compiled for sm_90 and sm_80 to
check they fit the GPUs' shared memory. Tests marked ``gpu`` run at training shapes.
"""

import pytest
import torch

from hf_plugins.kernels.fftconv import triton as fft_triton
from hf_plugins.kernels.fftconv.reference import fft_conv_spectral_reference
from hf_plugins.kernels.fftconv.triton import fft_conv_triton, fft_digits, fft_size
from tests.kernels.gpu_compile import shared_memory
from tests.kernels.poison import poisoned_output
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, **HALF}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(fft_triton, "_new_output", poisoned_output)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def staged(monkeypatch):
    """Every size through the staged path, with 4..8-wide digits (orders 3 and 4 at small sizes: 256 = 8 x 8 x 4,
    2048 = 8 x 8 x 8 x 4) and 256-element blocks (several blocks per stage)."""
    monkeypatch.setattr(fft_triton, "WHOLE_MAX_FFT", 0)
    monkeypatch.setattr(fft_triton, "MIN_DIGIT", 4)
    monkeypatch.setattr(fft_triton, "MAX_DIGIT", 8)
    monkeypatch.setattr(fft_triton, "TILE", 256)


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


def gates_like(u: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 ``pre_gate`` and ``post_gate`` shaped like ``u``."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(u.shape, generator=generator, dtype=torch.float64).to(u.device)
            for name in ("pre_gate", "post_gate")}


def forward_backward(fn, u, k, dy, dtype, gates=None, **kwargs) -> dict[str, torch.Tensor]:
    """``fn`` on ``u, k`` (and the ``gates``) cast to ``dtype``: the output and the gradients of every input for
    the upstream ``dy``."""
    leaves = {"u": u, "k": k, **(gates or {})}
    leaves = {name: value.to(dtype).requires_grad_() for name, value in leaves.items()}
    y = fn(**leaves, **kwargs)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), **{f"d{name}": value.grad for name, value in leaves.items()}}


def oracle(u, k, dy, dtype, kernel_len=None, keep_frequencies=None, gates=None) -> dict[str, torch.Tensor]:
    """Float64 forward and gradients on the inputs rounded to ``dtype`` (the kernel's own inputs)."""
    u, k, dy = (x.to(dtype).double() for x in (u, k, dy))
    gates = {name: value.to(dtype).double() for name, value in (gates or {}).items()}

    def gated(u, k, pre_gate=None, post_gate=None):
        w = u if pre_gate is None else u * pre_gate
        if keep_frequencies is None and u.shape[-1] <= 1024:  # one slice per tap; longer: float64 torch.fft
            y = shifted_sum_oracle(w, k, kernel_len)
        else:
            y = fft_conv_spectral_reference(w, k, kernel_len, keep_frequencies)
        return y if post_gate is None else y * post_gate

    return forward_backward(gated, u, k, dy, torch.float64, gates)


def assert_all_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert torch.isfinite(value).all(), f"{name} has non-finite values (poisoned output not overwritten?)"
        assert value.shape == expected[name].shape, name
        error = max_rel_error(value, expected[name])
        assert error <= FLOAT_KERNEL_RTOL[dtype], f"{name}: max rel error {error:.3e} > {FLOAT_KERNEL_RTOL[dtype]}"


LENGTHS = [1, 7, 64, 1000, 4096, 16384]
KERNELS = {"short": lambda n: max(1, n // 3), "equal": lambda n: n, "long": lambda n: n + 5}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda name: f"taps-{name}")
@pytest.mark.parametrize("N", LENGTHS, ids=lambda n: f"N{n}")
def test_forward_and_gradients_match_the_direct_convolution(N, kernel):
    # 1000 -> M = 2048, order 2 in registers; 4096 -> 8192 = 32 x 16 x 16 and 16384 -> 32768 = 32 x 32 x 32, staged
    batch, channels = (1, 1) if N >= 4096 else (3, 2)  # batch 3: one pair of rows and a lone one per channel
    u, k, dy = conv_inputs(batch, channels, N, KERNELS[kernel](N), seed=N)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32)
    assert actual["y"].dtype == torch.float32 and actual["dk"].dtype == torch.float32
    assert_all_close(actual, oracle(u, k, dy, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N", [64, 1000, 3000], ids=lambda n: f"N{n}")
def test_dtypes(N, dtype):
    u, k, dy = conv_inputs(2, 3, N, N, seed=N + 1)
    actual = forward_backward(fft_conv_triton, u, k, dy, dtype)
    assert actual["y"].dtype == dtype and actual["du"].dtype == dtype and actual["dk"].dtype == dtype
    assert_all_close(actual, oracle(u, k, dy, dtype), dtype)


@pytest.mark.parametrize(("N", "taps", "kernel_len"), [(7, 7, 3), (300, 400, 1), (1000, 1000, 257), (64, 80, 70),
                                                       (3000, 3000, 1100)], ids=lambda x: str(x))
def test_partial_convolution_uses_the_first_kernel_len_taps(N, taps, kernel_len):
    u, k, dy = conv_inputs(2, 3, N, taps, seed=taps)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, kernel_len=kernel_len)
    expected = oracle(u, k, dy, torch.float32, kernel_len=kernel_len)
    assert_all_close(actual, expected, torch.float32)
    assert (actual["dk"][:, kernel_len:] == 0).all()


@pytest.mark.parametrize("keep", [0.01, 0.25, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize(("N", "taps"), [(7, 5), (100, 300), (1000, 1000), (4096, 4096)], ids=lambda x: str(x))
def test_frequency_sparse_matches_the_spectral_definition(N, taps, keep):
    u, k, dy = conv_inputs(2, 3 if N < 4096 else 1, N, taps, seed=N + taps)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, keep_frequencies=keep), torch.float32)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_frequency_sparse_partial_half_precision(dtype):
    u, k, dy = conv_inputs(2, 3, 500, 600, seed=7)
    actual = forward_backward(fft_conv_triton, u, k, dy, dtype, kernel_len=400, keep_frequencies=0.3)
    assert_all_close(actual, oracle(u, k, dy, dtype, kernel_len=400, keep_frequencies=0.3), dtype)


GATES = {"pre": ("pre_gate",), "post": ("post_gate",), "both": ("pre_gate", "post_gate")}


@pytest.mark.parametrize("which", GATES)
@pytest.mark.parametrize(("batch", "N", "keep"), [(1, 100, None), (3, 100, None), (2, 1000, 0.3), (3, 3000, None),
                                                  (2, 4096, 0.2)], ids=lambda x: str(x))
def test_gates_are_applied_in_the_kernel_with_their_gradients(batch, N, keep, which):
    u, k, dy = conv_inputs(batch, 2, N, N, seed=N + batch)
    gates = {name: value for name, value in gates_like(u, seed=N).items() if name in GATES[which]}
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, gates, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, keep_frequencies=keep, gates=gates), torch.float32)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_gates_half_precision(dtype):
    u, k, dy = conv_inputs(3, 2, 700, 700, seed=3)
    gates = gates_like(u, seed=3)
    actual = forward_backward(fft_conv_triton, u, k, dy, dtype, gates)
    assert_all_close(actual, oracle(u, k, dy, dtype, gates=gates), dtype)


def test_only_the_gates_need_gradients():
    u, k, dy = conv_inputs(2, 2, 300, 300, seed=5)
    gates = gates_like(u, seed=5)
    pre, post = (gates[name].float().requires_grad_() for name in ("pre_gate", "post_gate"))
    y = fft_conv_triton(u.float(), k.float(), pre_gate=pre, post_gate=post)
    y.backward(dy.float())
    expected = oracle(u, k, dy, torch.float32, gates=gates)
    assert max_rel_error(pre.grad, expected["dpre_gate"]) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert max_rel_error(post.grad, expected["dpost_gate"]) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize(("N", "taps", "keep", "gated"), [(7, 7, None, True), (100, 100, 0.05, False),
                                                          (129, 129, None, True), (1000, 600, 0.3, True),
                                                          (1000, 1000, 0.02, False)], ids=lambda x: str(x))
def test_staged_orders_3_and_4(staged, N, taps, keep, gated):
    # digits: 7 and 100 -> 256 = 8 x 8 x 4; 129 -> 512 = 8 x 8 x 8; 1000 -> 2048 = 8 x 8 x 8 x 4 (order 4)
    assert len(fft_digits(fft_size(N))) == (4 if N == 1000 else 3)
    u, k, dy = conv_inputs(3, 2, N, taps, seed=N + taps)
    gates = gates_like(u, seed=N) if gated else None
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, gates, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, keep_frequencies=keep, gates=gates), torch.float32)


def test_partial_filter_gradient_computes_only_the_columns_its_taps_reach(staged, monkeypatch):
    # 2000 -> M = 4096 = 16 x 16 x 16 (16-wide digits at most): 100 taps lie in the times n = n0 * 256 + i with
    # n0 < 1, so the last inverse stage computes MIN_DIGIT = 4 of its 16 columns (the dense default: 8)
    monkeypatch.setattr(fft_triton, "MAX_DIGIT", 16)
    assert fft_digits(4096) == (16, 16, 16) and fft_triton._reached_columns(100, 256, 16) == 4
    u, k, dy = conv_inputs(1, 1, 2000, 2000, seed=3)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.float32, kernel_len=100)
    assert_all_close(actual, oracle(u, k, dy, torch.float32, kernel_len=100), torch.float32)


def test_staged_half_precision(staged):
    u, k, dy = conv_inputs(2, 2, 300, 300, seed=9)
    for dtype in HALF.values():
        assert_all_close(forward_backward(fft_conv_triton, u, k, dy, dtype), oracle(u, k, dy, dtype), dtype)


def test_frequency_sparse_skips_the_zero_column_blocks(staged, monkeypatch):
    # 16-wide digits at most: 300 -> M = 1024 = 8 x 8 x 16; the frequency digit (the last, 16 wide) runs in blocks
    # of MIN_DIGIT = 4 columns, block j holding the bins [256 j, 256 (j + 1)). keep 0.3 -> 154 of 513 bins: blocks
    # 1 and 2 are all zero. A skipped block is never read, so poisoning the spectrum there must leave the output
    # unchanged; a block that is read would turn it NaN.
    monkeypatch.setattr(fft_triton, "MAX_DIGIT", 16)
    assert fft_digits(1024) == (8, 8, 16)
    u, k, _ = conv_inputs(2, 1, 300, 300, seed=1)
    keep = 154
    sre, sim = fft_triton._spectrum(fft_triton._filter_taps(k.float(), 300, 300, 0.3, 1024), 1024)
    expected, _ = fft_triton._launch(u.float(), (sre, sim), keep)
    block = torch.arange(1024) % 16 // 4
    skipped = (block == 1) | (block == 2)
    frequency = fft_triton._digit_reversal(fft_digits(1024), u.device)
    assert torch.all((frequency[skipped] >= keep) & (frequency[skipped] <= 1024 - keep))
    poisoned = tuple(part.masked_fill(skipped, float("nan")) for part in (sre, sim))
    assert torch.equal(fft_triton._launch(u.float(), poisoned, keep)[0], expected)
    assert torch.isnan(fft_triton._launch(u.float(), poisoned, 0)[0]).all()  # without the skip: NaN everywhere
    assert max_rel_error(expected, oracle(u, k, u, torch.float32, keep_frequencies=0.3)["y"]) <= 2e-5


def test_digit_reversal_is_the_staged_spectrum_order():
    # the staged forward transform of a single impulse at time 1 is exp(-2 pi i f / M) at the position holding f
    M = 8192
    frequency = fft_triton._digit_reversal(fft_digits(M), torch.device("cpu"))
    assert sorted(frequency.tolist()) == list(range(M))
    assert fft_digits(M) == (32, 16, 16) and fft_digits(1 << 17) == (64, 32, 64) and fft_digits(4096) == (64, 64)
    d0, d1, d2 = fft_digits(M)
    position = 5 * d1 * d2 + 3 * d2 + 11  # digits k0 = 5, k1 = 3, k2 = 11
    assert frequency[position] == 5 + d0 * (3 + d1 * 11)


def test_too_long_transforms_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"a 33554432-point transform needs 5 digits of at most 64, more than the 4"):
        fft_digits(1 << 25)


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
    with pytest.raises(TypeError, match="fp16, bf16 or fp32 pre_gate, got torch.float64"):
        fft_conv_triton(torch.zeros(1, 2, 8), torch.zeros(2, 3), pre_gate=torch.zeros(1, 2, 8, dtype=torch.float64))


SHARED_MEMORY = {90: 232448, 80: 166912}
"""Bytes of shared memory one block may use: H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB."""


@pytest.mark.parametrize(("dtype", "arch"), [("fp32", 90), ("fp16", 80)], ids=["fp32-sm90", "fp16-sm80"])
def test_kernels_compile_within_the_gpus_shared_memory(dtype, arch):
    # the largest register-held transform and a staged one, every feature on (the most live tiles) and every one
    # off (the lone-row, ungated branches)
    precision = fft_triton._PRECISION[{"fp32": torch.float32, "fp16": torch.float16}[dtype]]
    N1, N2 = fft_triton._factors(fft_triton.WHOLE_MAX_FFT)
    whole = {"N1": N1, "N2": N2, "NH": fft_triton._half(N2)}
    M = 1 << 17
    staged_args = fft_triton._digit_args(M)
    kernels = []
    for on in (True, False):
        flags = {"HAS_PRE": on, "HAS_POST": on, "PREC": precision}
        conv_flags = {**flags, "STORE_Z": on, "PAIRED": on, "REVERSE": on}
        kernels += [("_whole_conv_kernel", {**whole, **conv_flags}),
                    ("_whole_filter_grad_kernel", {**whole, "NOUT": N2, **flags}),
                    ("_staged_conv_kernel", {**staged_args, "DL": fft_digits(M)[-1], "CB": 16, **conv_flags}),
                    ("_staged_filter_grad_kernel", {**staged_args, "NOUT": fft_digits(M)[0], **flags})]
    cases = [{"module": fft_triton.__name__, "kernel": name, "constants": constants, "dtype": dtype, "arch": arch,
              "typed": ["x", "y", "z", "pre", "post", "dy"], "ints": ["batch", "channels", "seq", "KEEP", "taps"]}
             for name, constants in kernels]
    for (name, constants), shared in zip(kernels, shared_memory(cases)):
        assert 0 < shared <= SHARED_MEMORY[arch], f"{name} {constants}: {shared} bytes of shared memory"


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [None, 0.25], ids=["dense", "keep0.25"])
def test_gpu_bf16_at_training_shapes(keep):
    # N = 16384 -> M = 32768 = 32 x 32 x 32, staged
    u, k, dy = conv_inputs(4, 64, 16384, 16384, device="cuda", seed=1)
    gates = gates_like(u, seed=1)
    actual = forward_backward(fft_conv_triton, u, k, dy, torch.bfloat16, gates, keep_frequencies=keep)
    assert_all_close(actual, oracle(u, k, dy, torch.bfloat16, keep_frequencies=keep, gates=gates), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N", [1, 200, 1000, 1024, 2048, 4096, 8191, 65536], ids=lambda n: f"N{n}")
def test_gpu_both_paths_and_dtypes(N, dtype):
    u, k, dy = conv_inputs(3, 64, N, N, device="cuda", seed=N)
    assert_all_close(forward_backward(fft_conv_triton, u, k, dy, dtype), oracle(u, k, dy, dtype), dtype)
