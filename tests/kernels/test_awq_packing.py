"""Lossless packing: AWQ nibble packing, ATen's int4pack layouts, and CPU prepack/unprepack (all bit-exact)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_plugins.kernels.awq_gemm import CpuAwqWeight, pack_awq, prepack, unpack_awq, unprepack
from hf_plugins.kernels.awq_gemm import cpu as awq_cpu

REPO_ROOT = Path(__file__).resolve().parents[2]


def _random_awq(in_features: int, out_features: int, group_size: int, scale_dtype=torch.float16):
    """Random AWQ tensors ``(qweight, qzeros, scales)``; ``group_size=-1`` is per-channel, partial groups allowed."""
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    qweight = pack_awq(torch.randint(0, 16, (in_features, out_features), dtype=torch.int32))
    qzeros = pack_awq(torch.randint(0, 16, (groups, out_features), dtype=torch.int32))
    scales = (torch.rand(groups, out_features) * 0.02 + 1e-3).to(scale_dtype)
    return qweight, qzeros, scales


@pytest.mark.parametrize("rows", [1, 7, 129], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("cols", [8, 24, 264], ids=lambda c: f"cols{c}")
def test_pack_unpack_round_trip(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    packed = pack_awq(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
    assert torch.equal(unpack_awq(packed), codes)


def test_unpack_pack_round_trip_covers_negative_words():
    words = torch.randint(-(2**31), 2**31 - 1, (5, 3), dtype=torch.int64).to(torch.int32)
    words[0, 0] = -1
    assert torch.equal(pack_awq(unpack_awq(words)), words)


def test_pack_awq_nibble_order():
    codes = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    # Nibble j holds channel AWQ_ORDER[j] = (0, 2, 4, 6, 1, 3, 5, 7).
    assert pack_awq(codes).item() == 0x75316420


@pytest.mark.parametrize(
    "codes, match",
    [
        pytest.param(torch.zeros(2, 12, dtype=torch.int32), "divisible by 8", id="cols-not-multiple-of-8"),
        pytest.param(torch.full((2, 8), 16, dtype=torch.int32), r"codes in \[0, 15\]", id="code-out-of-range"),
    ],
)
def test_pack_awq_rejects_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        pack_awq(codes)


def _aten_pack_loops(codes: torch.Tensor, kind: str, block_n: int) -> torch.Tensor:
    """A literal transcription of ATen's ``weight_to_int4pack_kernel`` loops (full blocks) for one layout."""
    out_features, in_features = codes.shape
    half = block_n // 2
    packed = torch.zeros(out_features // block_n, in_features, half, dtype=torch.uint8)
    for nb in range(out_features // block_n):
        src = codes[nb * block_n : (nb + 1) * block_n]
        for k in range(in_features):
            for j in range(half):
                low, high = (src[j, k], src[j + half, k]) if kind == "split" else (src[2 * j, k], src[2 * j + 1, k])
                packed[nb, k, j] = int(low) | (int(high) << 4)
    return packed.reshape(out_features, in_features // 2)


@pytest.mark.parametrize("kind, block_n", awq_cpu._LAYOUT_CANDIDATES, ids=lambda v: str(v))
def test_layout_model_matches_aten_loops(kind, block_n):
    codes = torch.randint(0, 16, (128, 6), dtype=torch.int32)
    packed = _aten_pack_loops(codes, kind, block_n)
    codes_by_row = codes.t().to(torch.uint8).contiguous()
    assert torch.equal(awq_cpu._pack_layout(codes_by_row, kind, block_n), packed)
    assert torch.equal(awq_cpu._unpack_layout(packed, kind, block_n), codes_by_row)


@pytest.mark.parametrize("out_features, in_features", [(64, 32), (192, 130), (1024, 66)], ids=lambda v: str(v))
def test_native_layout_matches_this_build(out_features, in_features):
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    codes_by_row = codes.t().to(torch.uint8).contiguous()
    assert torch.equal(awq_cpu._pack_layout(codes_by_row, *awq_cpu.native_layout()), native)
    assert torch.equal(awq_cpu._unpack_layout(native, *awq_cpu.native_layout()), codes_by_row)


@pytest.mark.parametrize("rows, cols", [(1, 8), (7, 24), (130, 264)], ids=lambda v: str(v))
def test_fast_awq_conversions_match_reference(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    qweight = pack_awq(codes)
    fast_codes = awq_cpu._awq_to_codes(qweight, cols + 64)
    assert torch.equal(fast_codes[:, :cols].to(torch.int32), codes) and not fast_codes[:, cols:].any()
    assert torch.equal(awq_cpu._codes_to_awq(fast_codes, cols), qweight)


PREPACK_CASES = [
    pytest.param(128, 8, 32, torch.float16, id="K128-N8-g32"),
    pytest.param(384, 24, 128, torch.float16, id="K384-N24-g128"),
    pytest.param(576, 264, 128, torch.float16, id="K576-N264-g128-partial-group"),
    pytest.param(256, 40, -1, torch.float32, id="K256-N40-per-channel-fp32-scales"),
    pytest.param(96, 16, 48, torch.float16, id="K96-N16-g48-no-kernel-group"),
    pytest.param(64, 72, 128, torch.bfloat16, id="K64-N72-g128-one-partial-group"),
]


LAYOUTS = ["auto", "int4pack"]
"""``auto`` is the native q4dot layout where it is built and takes the shape, else int4pack."""


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_features, out_features, group_size, scale_dtype", PREPACK_CASES)
def test_prepack_unprepack_bit_exact(in_features, out_features, group_size, scale_dtype, layout):
    qweight, qzeros, scales = _random_awq(in_features, out_features, group_size, scale_dtype)
    weight = prepack(qweight, qzeros, scales, group_size, layout=layout)
    back = unprepack(weight)
    for restored, original in zip(back, (qweight, qzeros, scales)):
        assert restored.dtype == original.dtype and torch.equal(restored, original)
    assert (weight.in_features, weight.out_features) == (in_features, out_features)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepack_extreme_codes_round_trip(layout):
    codes = torch.tensor([[0, 15] * 32] * 128, dtype=torch.int32)
    qweight, qzeros, scales = pack_awq(codes), pack_awq(torch.full((2, 64), 15, dtype=torch.int32)), torch.ones(2, 64)
    assert torch.equal(unprepack(prepack(qweight, qzeros, scales, 64, layout=layout))[0], qweight)


@pytest.mark.parametrize(
    "in_features, out_features, group_size",
    [pytest.param(1536, 1536, 128, id="1536x1536-g128"), pytest.param(576, 1536, 128, id="576x1536-g128-partial")],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepacked_weight_is_at_most_30_percent_of_bf16(in_features, out_features, group_size, layout):
    """int4pack: with the scales our quantizer writes (bf16-exact) no scale remainder is needed and the zeros are
    recovered. q4dot: codes, fp32 scales and scaled zeros, and the checkpoint's scales and zeros for unprepack."""
    qweight, qzeros, scales = _random_awq(in_features, out_features, group_size)
    weight = prepack(qweight, qzeros, scales.bfloat16().half(), group_size, layout=layout)
    if weight.packed is not None:
        assert isinstance(weight, CpuAwqWeight) and weight.scale_residual is None and weight.qzeros is None
    assert weight.nbytes() <= 0.30 * in_features * out_features * 2


def test_prepack_keeps_zeros_it_cannot_recover():
    """A zero scale (e.g. a dead channel) hides its zero point in the kernel's pairs: the checkpoint's is kept."""
    qweight, qzeros, scales = _random_awq(128, 16, 32)
    scales[1, 3] = 0
    weight = prepack(qweight, qzeros, scales, 32)
    assert weight.qzeros is not None
    assert torch.equal(unprepack(weight)[1], qzeros)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        pytest.param(lambda qw, qz, s: (qw.long(), qz, s, 32), TypeError, "int32", id="int64-qweight"),
        pytest.param(lambda qw, qz, s: (qw, qz, s.int(), 32), TypeError, "float tensor", id="int-scales"),
        pytest.param(lambda qw, qz, s: (qw, qz, s, 64), ValueError, r"ceil\(in / group\)", id="wrong-group"),
        pytest.param(lambda qw, qz, s: (qw, qz, s, 0), ValueError, "positive or -1", id="zero-group"),
        pytest.param(lambda qw, qz, s: (qw[:96], qz, s, 32), ValueError, r"ceil\(in / group\)", id="rows-mismatch"),
        pytest.param(lambda qw, qz, s: (qw[:127], qz, s, 32), ValueError, "must be even", id="odd-in-features"),
    ],
)
def test_prepack_rejects_bad_inputs(mutate, error, match):
    args = mutate(*_random_awq(128, 16, 32))
    with pytest.raises(error, match=match):
        prepack(*args)


_AVX2_SCRIPT = textwrap.dedent(
    """
    import torch
    from hf_plugins.kernels.awq_gemm import awq_gemm_reference, pack_awq, prepack, unprepack
    from hf_plugins.kernels.awq_gemm import cpu
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert cpu.native_layout() == ("split", 32), cpu.native_layout()
    qweight = pack_awq(torch.randint(0, 16, (256, 104), dtype=torch.int32))
    qzeros = pack_awq(torch.randint(0, 16, (2, 104), dtype=torch.int32))
    scales = torch.rand(2, 104).half()
    x = torch.randn(5, 256)
    ref = awq_gemm_reference(x, qweight, qzeros, scales, 128).double()
    checks = [("int4pack", "int4pack", 1.6e-2), ("int4pack", "dequant", 2e-5)]
    if cpu.q4dot_available():
        checks += [("q4dot", "q4dot", 1e-4), ("q4dot", "dequant", 2e-5)]
    for layout, route, tol in checks:
        weight = prepack(qweight, qzeros, scales, 128, layout=layout)
        assert all(torch.equal(a, b) for a, b in zip(unprepack(weight), (qweight, qzeros, scales)))
        err = ((cpu._by_route(route, x, weight).double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= tol, (layout, route, err)
    print("ok", len(checks))
    """
)


def test_avx2_build_layout_in_subprocess():
    """The documented target CPUs are AVX2-only, whose int4pack layout differs and whose q4dot build takes the
    vpmaddubsw path: emulate one with ATEN_CPU_CAPABILITY and an AVX2 (haswell) native build."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("ATEN_CPU_CAPABILITY=avx2 needs an x86 CPU with AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "HF_PLUGINS_NATIVE_MARCH": "haswell",
           "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    from hf_plugins.kernels.awq_gemm.q4dot import q4dot_available

    expected = f"ok {4 if q4dot_available() else 2}"
    assert result.returncode == 0 and result.stdout.strip().endswith(expected), result.stderr[-2000:]


@pytest.mark.parametrize("forced", ["q4dot", "int4pack"])
def test_auto_layout_follows_the_forced_route(forced, monkeypatch):
    """Where both kernels run, ``layout="auto"`` keeps the codes in the layout of the faster one (measured once per
    shape class); ``HF_PLUGINS_ROUTE`` forces it like any route."""
    from hf_plugins.kernels.awq_gemm import cpu

    if not cpu.q4dot_available() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs both the native q4dot kernel and a vectorized int4pack build")
    monkeypatch.setenv("HF_PLUGINS_ROUTE", forced)
    weight = prepack(*_random_awq(128, 64, 64), 64)
    assert (weight.packed is None) == (forced == "q4dot")


def test_auto_layout_is_measured_once_per_shape_class(monkeypatch, tmp_path):
    from hf_plugins.kernels import _routes
    from hf_plugins.kernels.awq_gemm import cpu

    monkeypatch.setattr(_routes, "table_path", lambda: tmp_path / "routes.json")
    if not cpu.q4dot_available() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs both the native q4dot kernel and a vectorized int4pack build")
    monkeypatch.delenv("HF_PLUGINS_ROUTE", raising=False)
    cpu.LAYOUTS.forget()
    timed = []
    real_by_route = cpu._by_route
    monkeypatch.setattr(cpu, "_by_route", lambda route, x, weight: timed.append(route) or real_by_route(route, x, weight))
    tensors = _random_awq(192, 64, 64)
    first = prepack(*tensors, 64)
    assert sorted(set(timed)) == ["int4pack", "q4dot"]
    timed.clear()
    second = prepack(*tensors, 64)
    assert timed == [] and (first.packed is None) == (second.packed is None)
