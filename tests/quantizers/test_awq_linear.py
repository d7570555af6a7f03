"""``AwqLinear`` of every bit width on CPU: the packed kernels serve it, results match its dequantized weight, and
checkpoints stay bit-identical while the prepacked form is the one in memory."""

import logging

import pytest
import torch

from hf_plugins import AwqLinear
from hf_plugins.quantizers.awq import modules as awq_modules
from tests.tolerances import assert_close_kernel


def _layer(bits: int, in_features: int, out_features: int, group_size: int) -> AwqLinear:
    torch.manual_seed(bits)
    return AwqLinear.from_linear(torch.nn.Linear(in_features, out_features), bits, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows", [1, 9, 40], ids=lambda m: f"M{m}")
def test_every_width_runs_packed_and_matches_its_weight(bits, rows):
    layer = _layer(bits, 192, 48, 64)
    checkpoint = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, rows, 192)
    expected = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    with torch.inference_mode():
        actual = layer(x)
    assert layer._cpu_weight is not None and layer.qweight.numel() == 0, "the packed CPU form must serve the layer"
    assert_close_kernel(actual, expected, "int8x2")
    after = layer.state_dict()
    assert after.keys() == checkpoint.keys()
    assert all(torch.equal(after[k], checkpoint[k]) and after[k].dtype == checkpoint[k].dtype for k in checkpoint)


@pytest.mark.parametrize("bits", [3, 8])
def test_reload_into_a_prepacked_layer_replaces_its_weight(bits):
    source, target = _layer(bits, 192, 48, 64), _layer(bits, 192, 48, 64)
    torch.nn.init.normal_(source.scales)
    x = torch.randn(3, 192)
    with torch.inference_mode():
        target(x)
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(x), source(x))


def test_gradient_reaches_the_input_through_a_wide_layer():
    layer = _layer(6, 128, 32, 64)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_layers_no_kernel_takes_warn_once_and_stay_exact(caplog):
    awq_modules._warn_dequant_path.cache_clear()
    layer = _layer(3, 96, 20, 32)  # out_features % 8: no int4 layout
    x = torch.randn(2, 96)
    with caplog.at_level(logging.WARNING, logger=awq_modules.__name__), torch.inference_mode():
        for _ in range(2):
            actual = layer(x)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "AWQ W3 96x20 on cpu multiplies a dequantized copy" in warnings[0]
    torch.testing.assert_close(actual, torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
