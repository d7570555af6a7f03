"""The oneDNN dense linear against its float64 reference, the per-dtype route check, and the FastLinear switch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_plugins.kernels.dense_linear import (
    FastLinear,
    dense_linear,
    dense_linear_cpu,
    dense_linear_reference,
    fast_linears,
    use_fast_linears,
)
from hf_plugins.kernels.dense_linear import cpu as onednn
from tests.tolerances import assert_close_kernel

SHAPES = [((1, 37), 23), ((6, 129), 257), ((2, 5, 64), 96), ((3, 1, 1, 200), 7)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _problem(x_shape, out_features, bias, dtype):
    gen = torch.Generator().manual_seed(sum(x_shape) + out_features)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    weight = torch.randn(out_features, x_shape[-1], generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x, weight, b


@pytest.fixture
def fresh_support_check():
    """Forget the cached per-dtype support decision before and after the test (it may force a capability)."""
    onednn.onednn_linear_supports.cache_clear()
    yield
    onednn.onednn_linear_supports.cache_clear()


@DTYPES
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("x_shape", "out_features"), SHAPES, ids=lambda v: str(v))
def test_onednn_linear_matches_reference(x_shape, out_features, bias, dtype):
    if not onednn.onednn_linear_supports(dtype):
        pytest.skip(f"oneDNN has no {dtype} linear on this CPU ({torch.backends.cpu.get_cpu_capability()}); "
                    "the plain-route tests below cover it")
    x, weight, b = _problem(x_shape, out_features, bias, dtype)
    assert_close_kernel(dense_linear_cpu(x, weight, b), dense_linear_reference(x, weight, b), dtype)


@DTYPES
@pytest.mark.parametrize(("x_shape", "out_features"), SHAPES, ids=lambda v: str(v))
def test_dense_linear_matches_reference_on_this_machine(x_shape, out_features, dtype):
    x, weight, b = _problem(x_shape, out_features, True, dtype)
    assert_close_kernel(dense_linear(x, weight, b), dense_linear_reference(x, weight, b), dtype)


def test_bf16_without_the_cpu_capability_takes_the_plain_route(monkeypatch, fresh_support_check):
    monkeypatch.setattr(onednn, "cpu_has_onednn_bf16", lambda: False)
    x, weight, b = _problem((3, 5, 64), 96, True, torch.bfloat16)
    assert not onednn.onednn_linear_supports(torch.bfloat16)
    assert onednn.onednn_linear_supports(torch.float32) == onednn.onednn_linear_available()
    assert torch.equal(dense_linear(x, weight, b), torch.nn.functional.linear(x, weight, b))
    with pytest.raises(TypeError, match="oneDNN has no torch.bfloat16 linear on this CPU .*use dense_linear"):
        dense_linear_cpu(x, weight, b)


def test_a_failing_onednn_primitive_takes_the_plain_route(monkeypatch, fresh_support_check):
    def no_primitive(*args):
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")

    monkeypatch.setattr(onednn, "cpu_has_onednn_bf16", lambda: True)  # the query says yes, the primitive says no
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", no_primitive)
    x, weight, b = _problem((2, 37), 23, False, torch.bfloat16)
    assert torch.equal(dense_linear(x, weight, b), torch.nn.functional.linear(x, weight, b))
    assert not onednn.onednn_linear_supports(torch.float32)


_AVX2_SCRIPT = textwrap.dedent(
    """
    import torch
    import hf_plugins
    from hf_plugins.kernels.dense_linear import cpu, dense_linear
    from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_model
    torch.set_num_threads(1)
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert not cpu.onednn_linear_supports(torch.bfloat16) and cpu.onednn_linear_supports(torch.float32)
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert torch.equal(dense_linear(x, w), torch.nn.functional.linear(x, w))
    target = tiny_model("llama")[0].to(torch.bfloat16)
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    prompt = torch.randint(3, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    out = target.generate(prompt, assistant_model=draft, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, plain), (out, plain)
    print("ok")
    """
)


def test_bf16_speculative_decoding_on_an_avx2_cpu_in_subprocess():
    """AVX2-only CPUs have no oneDNN bf16 linear: emulate one (ATen and oneDNN capped to AVX2) and decode a bf16
    model speculatively through the CPU fast linears, which must take F.linear for bf16 there."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("ATEN_CPU_CAPABILITY=avx2 needs an x86 CPU with AVX2")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=repo)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not onednn.onednn_linear_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("route", ["onednn", "torch"])
def test_forced_routes_run_and_agree(route, monkeypatch, fresh_support_check):
    calls = []
    routed = onednn.dense_linear_cpu
    monkeypatch.setattr("hf_plugins.kernels.dense_linear.dense_linear_cpu",
                        lambda *args: calls.append(args[0].dtype) or routed(*args))
    monkeypatch.setenv("HF_PLUGINS_ROUTE", route)
    for dtype in (torch.float32, torch.bfloat16):
        x, weight, b = _problem((5, 129), 257, True, dtype)
        assert_close_kernel(dense_linear(x, weight, b), dense_linear_reference(x, weight, b), dtype)
    expected = [d for d in (torch.float32, torch.bfloat16) if onednn.onednn_linear_supports(d)]
    assert calls == (expected if route == "onednn" else []) and torch.float32 in expected


def test_shape_classes_bucket_rows_by_powers_of_two():
    from hf_plugins.kernels.dense_linear import _shape_class

    weight = torch.empty(7, 33)
    classes = [_shape_class(torch.empty(*lead, 33), weight) for lead in ((1,), (1, 1), (3,), (2, 2), (5,), (9000,))]
    assert classes == [("float32", 33, 7, 1), ("float32", 33, 7, 1), ("float32", 33, 7, 4), ("float32", 33, 7, 4),
                       ("float32", 33, 7, 8), ("float32", 33, 7, 512)]


def test_fast_linears_keep_parameters_state_dict_and_gradients():
    model = nn.Sequential(nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 5, bias=False))
    x = torch.randn(4, 33)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    assert use_fast_linears(model) == 2
    assert isinstance(model[0], FastLinear) and model[0].weight is weight
    with torch.no_grad():
        assert_close_kernel(model(x), expected, torch.float32)
    model(x).sum().backward()  # training goes through F.linear
    assert model[0].weight.grad is not None
    assert model.state_dict().keys() == state.keys()
    assert use_fast_linears(model, enable=False) == 2 and type(model[0]) is nn.Linear


def test_fast_linears_block_switches_back_only_what_it_switched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    use_fast_linears(model[1])  # switched by the user before: stays switched
    with fast_linears(model):
        assert type(model[0]) is FastLinear and type(model[1]) is FastLinear
    assert type(model[0]) is nn.Linear and type(model[1]) is FastLinear
    with fast_linears(model, enabled=False):
        assert type(model[0]) is nn.Linear
