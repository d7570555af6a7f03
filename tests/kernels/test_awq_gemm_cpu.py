"""The CPU AWQ GEMM path against the float64 reference, its kernel-choice rule, and backend dispatch.

Tolerances come from ``tests/tolerances.py`` by the activation dtype the kernel actually computes with: the int4pack
kernel is only fast with bf16 activations, so it casts fp32/fp16 inputs to bf16 (bf16 tolerance); q4dot quantizes
them to two int8 levels per 64-input block (int8x2 tolerance); the dequant kernel computes in fp32 (fp32 tolerance, or the
input's dtype when that is coarser).
"""

import logging

import pytest
import torch

from hf_plugins.kernels import _dispatch
from hf_plugins.kernels.awq_gemm import awq_gemm, awq_gemm_cpu, awq_gemm_reference, pack_awq, prepack
from hf_plugins.kernels.awq_gemm import cpu as awq_cpu
from tests.tolerances import assert_close_kernel


def _random_awq(in_features: int, out_features: int, group_size: int):
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    qweight = pack_awq(torch.randint(0, 16, (in_features, out_features), dtype=torch.int32))
    qzeros = pack_awq(torch.randint(0, 16, (groups, out_features), dtype=torch.int32))
    scales = (torch.rand(groups, out_features) * 0.02 + 1e-3).half()
    return qweight, qzeros, scales


def _compute_dtype(kernel: str, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose rounding bounds a kernel's error: bf16 for int4pack, else fp32 or the coarser input."""
    if kernel == "int4pack":
        return torch.bfloat16
    if kernel == "q4dot":
        return "int8x2" if x_dtype == torch.float32 else x_dtype
    return torch.float32 if x_dtype == torch.float32 else x_dtype


@pytest.fixture
def poison_allocations(monkeypatch):
    """Make ``torch.empty`` and ``Tensor.new_empty`` return NaN-filled tensors, so unwritten outputs show."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def new_empty(self, *args, **kwargs):
        t = real_new_empty(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


@pytest.fixture
def force_kernel(monkeypatch):
    """Force :func:`awq_gemm_cpu` onto one route (``HF_PLUGINS_ROUTE``), whatever this machine would measure."""

    def force(kernel: str) -> None:
        monkeypatch.setenv("HF_PLUGINS_ROUTE", kernel)

    return force


KERNELS = ["q4dot", "int4pack", "dequant", "dequant-int4pack-layout"]
"""Routes to test; the dequant route reads either layout, so it runs on both."""


def _prepack_for(kernel: str, rows: int, *awq, layout: str | None = None):
    """``(weight, route)``: the AWQ tensors prepacked in the layout ``kernel`` reads; skips where it is no route."""
    route, _, rest = kernel.partition("-")
    layout = layout or ("int4pack" if route == "int4pack" or rest else "auto")
    weight = prepack(*awq, layout=layout)
    if route not in awq_cpu.cpu_routes(rows, weight):
        pytest.skip(f"{route} is not a route for this layer and {rows} rows here "
                    f"({awq_cpu.cpu_routes(rows, weight)}; q4dot needs a C compiler and multiples of 64)")
    return weight, route


SHAPES = [
    pytest.param(128, 8, 32, id="K128-N8-g32"),
    pytest.param(384, 24, 128, id="K384-N24-g128"),
    pytest.param(384, 264, 64, id="K384-N264-g64"),
    pytest.param(576, 264, 128, id="K576-N264-g128-partial"),
    pytest.param(256, 40, -1, id="K256-N40-per-channel"),
    pytest.param(96, 16, 48, id="K96-N16-g48"),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("in_features, out_features, group_size", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 64], ids=lambda m: f"M{m}")
def test_cpu_kernels_match_reference(
    kernel, in_features, out_features, group_size, rows, force_kernel, poison_allocations
):
    qweight, qzeros, scales = _random_awq(in_features, out_features, group_size)
    weight, route = _prepack_for(kernel, rows, qweight, qzeros, scales, group_size)
    force_kernel(route)
    x = torch.randn(rows, in_features)
    expected = awq_gemm_reference(x, qweight, qzeros, scales, weight.group_size)
    actual = awq_gemm_cpu(x, weight)
    assert actual.shape == (rows, out_features) and actual.dtype == torch.float32
    assert_close_kernel(actual, expected, _compute_dtype(route, x.dtype))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_3d_input_with_bias(kernel, x_dtype, force_kernel, poison_allocations):
    qweight, qzeros, scales = _random_awq(192, 72, 64)
    bias = torch.randn(72)
    weight, route = _prepack_for(kernel, 10, qweight, qzeros, scales, 64)
    force_kernel(route)
    x = torch.randn(2, 5, 192).to(x_dtype)
    actual = awq_gemm_cpu(x, weight, bias)
    expected = awq_gemm_reference(x.float(), qweight, qzeros, scales, 64, bias)
    assert actual.shape == (2, 5, 72) and actual.dtype == x_dtype
    assert_close_kernel(actual, expected, _compute_dtype(route, x_dtype))


@pytest.mark.parametrize("scales_kind", ["bf16-exact", "fp16"])
@pytest.mark.parametrize("rows", [1, 17], ids=lambda m: f"M{m}")
def test_int4pack_keeps_scales_and_zeros_exact(scales_kind, rows, force_kernel):
    """Zeros far from the kernel's 8 and inputs sharing an offset: rounding a group's scale or zero to bf16 would
    shift all outputs alike (3-6% max relative error here); only the bf16 rounding of the outputs may remain."""
    force_kernel("int4pack")
    in_features, out_features, group_size = 384, 72, 128
    zeros = torch.where(torch.rand(3, out_features) < 0.5, 0, 15).to(torch.int32)
    codes = (zeros.repeat_interleave(group_size, 0) + torch.randint(-1, 2, (in_features, out_features))).clamp(0, 15)
    scales = (torch.rand(3, out_features) * 0.02 + 1e-3).half()
    if scales_kind == "bf16-exact":
        scales = scales.bfloat16().half()
    qweight, qzeros = pack_awq(codes.to(torch.int32)), pack_awq(zeros)
    x = (3.0 + 0.1 * torch.randn(rows, in_features)).bfloat16().float()
    weight = prepack(qweight, qzeros, scales, group_size, layout="int4pack")
    assert (weight.scale_residual is None) == (scales_kind == "bf16-exact")
    expected = awq_gemm_reference(x, qweight, qzeros, scales, group_size)
    assert_close_kernel(awq_gemm_cpu(x, weight), expected, torch.bfloat16)


def test_cpu_empty_batch():
    weight = prepack(*_random_awq(64, 16, 32), 32)
    assert awq_gemm_cpu(torch.randn(2, 0, 64), weight).shape == (2, 0, 16)


@pytest.mark.parametrize(
    "capability, rows, kernel_group, q4dot, expected",
    [
        pytest.param("AVX512", 1, 128, True, ("q4dot", "int4pack", "dequant"), id="avx512-M1-all"),
        pytest.param("AVX2", 32, 128, True, ("q4dot", "int4pack", "dequant"), id="avx2-M32-all"),
        pytest.param("AVX2", 33, 128, True, ("int4pack", "dequant"), id="avx2-M33-no-q4dot"),
        pytest.param("AVX512", 1, 128, False, ("int4pack", "dequant"), id="no-compiler"),
        pytest.param("DEFAULT", 1, 128, False, ("dequant",), id="scalar-build-dequant"),
        pytest.param("AVX512", 1, 0, False, ("dequant",), id="no-kernel-group-dequant"),
    ],
)
def test_route_candidates(capability, rows, kernel_group, q4dot, expected, monkeypatch):
    monkeypatch.setattr(awq_cpu, "_cpu_capability", lambda: capability)
    empty = torch.empty(0)
    weight = awq_cpu.CpuAwqWeight(
        empty, empty, None, empty, torch.empty(1, 8), None, group_size=128, kernel_group=kernel_group,
        q4dot=awq_cpu.Q4DotWeight(empty, empty, empty, 128) if q4dot else None,
    )
    assert awq_cpu.cpu_routes(rows, weight) == expected


@pytest.mark.parametrize(
    "x, error, match",
    [
        pytest.param(torch.randn(3, 65), ValueError, "65 input features but the weight expects 64", id="wrong-K"),
        pytest.param(torch.randn(3, 64).double(), TypeError, "float32/bfloat16/float16", id="float64"),
        pytest.param(torch.randn(3, 64, device="meta"), ValueError, "needs a CPU tensor", id="meta-device"),
    ],
)
def test_cpu_rejects_bad_inputs(x, error, match):
    weight = prepack(*_random_awq(64, 16, 32), 32)
    with pytest.raises(error, match=match):
        awq_gemm_cpu(x, weight)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("HF_PLUGINS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return monkeypatch


@pytest.mark.parametrize(
    "device, requested, env, expected",
    [
        pytest.param("cpu", None, None, "cpu", id="cpu-by-device"),
        pytest.param("cuda", None, None, "triton", id="cuda-by-device"),
        pytest.param("meta", None, None, "reference", id="other-device-reference"),
        pytest.param("cpu", None, "reference", "reference", id="env-forces"),
        pytest.param("cpu", "cpu", "reference", "cpu", id="argument-beats-env"),
        pytest.param("cpu", "auto", "reference", "reference", id="auto-defers-to-env"),
        pytest.param("cuda", "reference", None, "reference", id="reference-anywhere"),
    ],
)
def test_choose_backend(device, requested, env, expected, clean_env):
    if env:
        clean_env.setenv("HF_PLUGINS_BACKEND", env)
    assert _dispatch.choose_backend("awq_gemm", device, requested) == expected


@pytest.mark.parametrize(
    "device, requested, env, match",
    [
        pytest.param("cuda", "cpu", None, r"cpu backend \(backend='cpu' argument\) needs CPU", id="cpu-on-cuda"),
        pytest.param("cuda", None, "cpu", r"cpu backend \(HF_PLUGINS_BACKEND=cpu\)", id="env-cpu-on-cuda"),
        pytest.param("cpu", "triton", None, "set TRITON_INTERPRET=1", id="triton-on-cpu"),
        pytest.param("cpu", "cuda", None, "backend must be one of", id="unknown-backend"),
        pytest.param("cpu", None, "fast", "HF_PLUGINS_BACKEND must be one of", id="unknown-env"),
    ],
)
def test_choose_backend_errors(device, requested, env, match, clean_env):
    if env:
        clean_env.setenv("HF_PLUGINS_BACKEND", env)
    with pytest.raises(ValueError, match=match):
        _dispatch.choose_backend("awq_gemm", device, requested)


def test_triton_on_cpu_allowed_under_interpreter(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose_backend("awq_gemm", "cpu", "triton") == "triton"


def test_choice_is_logged_once(clean_env, caplog):
    _dispatch._log_choice.cache_clear()
    _dispatch._choose_backend.cache_clear()
    with caplog.at_level(logging.INFO, logger=_dispatch.__name__):
        for _ in range(3):
            _dispatch.choose_backend("awq_gemm", "cpu")
        _dispatch.choose_backend("awq_gemm", "cpu", "reference")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "hf_plugins: op awq_gemm on cpu uses the cpu backend (by device)",
        "hf_plugins: op awq_gemm on cpu uses the reference backend (backend='reference' argument)",
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("group_size", [64, -1], ids=lambda g: f"g{g}")
def test_awq_gemm_public_api(backend, group_size, clean_env):
    qweight, qzeros, scales = _random_awq(128, 24, group_size)
    bias = torch.randn(24)
    x = torch.randn(2, 3, 128)
    actual = awq_gemm(x, qweight, qzeros, scales, group_size, bias=bias, backend=backend)
    expected = awq_gemm_reference(x, qweight, qzeros, scales, 128 if group_size == -1 else group_size, bias)
    assert actual.shape == (2, 3, 24)
    assert_close_kernel(actual, expected, torch.bfloat16 if backend == "cpu" else torch.float32)


def test_awq_gemm_triton_backend_reshapes_and_adds_bias(clean_env):
    """The dispatcher's Triton wrapper (3-D input, bias) under the interpreter, at a tiny shape."""
    pytest.importorskip("triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    import hf_plugins.kernels.awq_gemm.triton as awq_triton

    if not awq_triton._INTERPRETER:
        pytest.skip("the Triton module was imported without TRITON_INTERPRET=1")
    qweight, qzeros, scales = _random_awq(64, 32, 32)
    bias = torch.randn(32)
    x = torch.randn(2, 3, 64)
    actual = awq_gemm(x, qweight, qzeros, scales, 32, bias=bias, backend="triton")
    assert actual.shape == (2, 3, 32)
    assert_close_kernel(actual, awq_gemm_reference(x, qweight, qzeros, scales, 32, bias), torch.float32)



def _random_codes(in_features: int, out_features: int, group_size: int, bits: int):
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    codes = torch.randint(0, 2**bits, (in_features, out_features), dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (groups, out_features), dtype=torch.uint8)
    scales = (torch.rand(groups, out_features) * 0.02 + 1e-3).half()
    return codes, zeros, scales


def _codes_reference(x: torch.Tensor, codes, zeros, scales, group_size: int) -> torch.Tensor:
    """float64 ``x @ ((codes - zeros) * scales)`` with group-repeated zeros and scales."""
    group = codes.shape[0] if group_size == -1 else group_size
    repeat = lambda t: t.double().repeat_interleave(group, 0)[: codes.shape[0]]  # noqa: E731
    return x.double() @ ((codes.double() - repeat(zeros)) * repeat(scales))


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("route", ["q4dot", "int4pack", "dequant"])
@pytest.mark.parametrize("in_features, out_features, group_size", [
    pytest.param(192, 40, 64, id="K192-N40-g64"),
    pytest.param(576, 24, 128, id="K576-N24-g128-partial"),
    pytest.param(256, 16, -1, id="K256-N16-per-channel"),
])
@pytest.mark.parametrize("rows", [1, 3, 17, 40], ids=lambda m: f"M{m}")
def test_codes_of_every_width_match_reference(bits, route, in_features, out_features, group_size, rows, force_kernel,
                                              poison_allocations):
    codes, zeros, scales = _random_codes(in_features, out_features, group_size, bits)
    weight = awq_cpu.prepack_codes(codes, zeros, scales, group_size, bits)
    assert weight is not None, "every width must have a CPU layout here (the native kernel built for 5..8 bits)"
    if route not in awq_cpu.cpu_routes(rows, weight):
        pytest.skip(f"{route} is not a route for W{bits} and {rows} rows ({awq_cpu.cpu_routes(rows, weight)})")
    force_kernel(route)
    x = torch.randn(rows, in_features)
    actual = awq_gemm_cpu(x, weight)
    expected = _codes_reference(x, codes, zeros, scales, group_size)
    assert actual.shape == (rows, out_features)
    assert_close_kernel(actual, expected, _compute_dtype(route, x.dtype))
    assert torch.equal(awq_cpu.unprepack_codes(weight), codes)


@pytest.mark.parametrize("bits", [5, 8])
def test_wide_codes_keep_one_byte_per_weight(bits):
    codes, zeros, scales = _random_codes(192, 40, 64, bits)
    weight = awq_cpu.prepack_codes(codes, zeros, scales, 64, bits)
    assert weight.packed is None and weight.q4dot.codes.shape == (40, 192)
    assert weight.q4dot.codes.dtype == torch.uint8 and weight.q4dot.bits == bits


def test_saturating_pairs_of_8_bit_codes_stay_exact(force_kernel):
    """All codes 255 against activations at +-127 in every pair: one int16 pair sum would saturate on AVX2."""
    force_kernel("q4dot")
    codes = torch.full((128, 16), 255, dtype=torch.uint8)
    zeros = torch.zeros(1, 16, dtype=torch.uint8)
    scales = torch.ones(1, 16).half()
    weight = awq_cpu.prepack_codes(codes, zeros, scales, 128, 8)
    x = torch.ones(2, 128)
    x[1] = -1.0
    assert_close_kernel(awq_gemm_cpu(x, weight), _codes_reference(x, codes, zeros, scales, 128), "int8x2")


@pytest.mark.parametrize("bits, in_features, out_features, native", [
    pytest.param(3, 192, 36, True, id="W3-out-not-multiple-of-8"),
    pytest.param(5, 96, 16, True, id="W5-in-not-multiple-of-64"),
    pytest.param(8, 192, 16, False, id="W8-without-native-kernel"),
])
def test_codes_without_a_cpu_layout(bits, in_features, out_features, native, monkeypatch):
    if not native:
        monkeypatch.setattr(awq_cpu, "q4dot_available", lambda: False)
    codes, zeros, scales = _random_codes(in_features, out_features, 32, bits)
    assert awq_cpu.prepack_codes(codes, zeros, scales, 32, bits) is None


def test_route_is_kept_per_weight_and_a_forced_route_still_wins(force_kernel, monkeypatch):
    qweight, qzeros, scales = _random_awq(128, 16, 64)
    weight = prepack(qweight, qzeros, scales, 64)
    x = torch.randn(1, 128)
    awq_gemm_cpu(x, weight)
    chosen = weight.chosen_routes[(torch.float32, 1)]
    taken, by_route = [], awq_cpu._by_route
    monkeypatch.setattr(awq_cpu, "_by_route", lambda route, *args: taken.append(route) or by_route(route, *args))
    monkeypatch.setattr(awq_cpu.ROUTES, "choose", lambda *args: pytest.fail("the kept route must be reused"))
    awq_gemm_cpu(x, weight)
    monkeypatch.undo()
    monkeypatch.setattr(awq_cpu, "_by_route", lambda route, *args: taken.append(route) or by_route(route, *args))
    force_kernel("dequant")
    awq_gemm_cpu(x, weight)
    assert taken == [chosen, "dequant"]
