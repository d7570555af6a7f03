"""The oneDNN dense linear against its float64 reference, and the FastLinear switch."""

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
from hf_plugins.kernels.dense_linear.cpu import onednn_linear_available
from tests.tolerances import assert_close_kernel

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")

SHAPES = [((1, 37), 23), ((6, 129), 257), ((2, 5, 64), 96), ((3, 1, 1, 200), 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("x_shape", "out_features"), SHAPES, ids=lambda v: str(v))
def test_onednn_linear_matches_reference(x_shape, out_features, bias, dtype):
    gen = torch.Generator().manual_seed(sum(x_shape) + out_features)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    weight = torch.randn(out_features, x_shape[-1], generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    expected = dense_linear_reference(x, weight, b)
    assert_close_kernel(dense_linear_cpu(x, weight, b), expected, dtype)
    assert_close_kernel(dense_linear(x, weight, b), expected, dtype)


def test_onednn_linear_refuses_mixed_dtypes_with_the_way_out():
    with pytest.raises(TypeError, match="use dense_linear\\(\\), which routes other dtypes to F.linear"):
        dense_linear_cpu(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))


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
