"""W4A4KV4 (COMET): config validation, FMPQ reordering and block choice, the W4Ax module, the quantizer."""

import pytest
import torch
from torch import nn

import hf_plugins
from hf_plugins import W4A4KV4Config, W4AxLinear
from hf_plugins.kernels.w4ax_gemm.reference import BLOCK, quantize_weight, w4ax_linear_reference
from hf_plugins.quantizers.comet.fmpq import AUTO_SLACK, InputStats, plan_layer
from tests.quantizers.tiny_models import random_token_ids, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error, sqnr_db


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(group_size=32), r"W4A4KV4Config\.group_size must be one of \[64, 128, -1\], got 32"),
        (dict(kv_bits=8), r"W4A4KV4Config\.kv_bits must be one of \[4, 16\], got 8"),
        (dict(outlier_blocks=-1), r"W4A4KV4Config\.outlier_blocks must be 'auto', 'all' or an int >= 0, got -1"),
        (dict(outlier_blocks="most"), r"outlier_blocks must be 'auto', 'all' or an int >= 0, got 'most'"),
        (dict(kv_group_size=7), r"W4A4KV4Config\.kv_group_size must be even"),
        (dict(kv_value_group_size=0), r"W4A4KV4Config\.kv_value_group_size must be a positive int, got 0"),
        (dict(calibration="pile"), r"W4A4KV4Config\.calibration must be one of \['wiki', 'news', 'code'\]"),
        (dict(kvbits=4), r"W4A4KV4Config got unknown keys \['kvbits'\]"),
    ],
)
def test_config_rejects_bad_values_with_the_constraint(kwargs, message):
    with pytest.raises(ValueError, match=message):
        W4A4KV4Config(**kwargs)


def test_config_round_trips_and_knows_when_it_needs_calibration():
    config = W4A4KV4Config(outlier_blocks=2, calibration=["some text"])
    again = W4A4KV4Config.from_dict(config.to_dict())
    assert again.to_dict() == {**config.to_dict(), "calibration": "custom"}
    assert config.needs_calibration and W4A4KV4Config(outlier_blocks="auto").needs_calibration
    assert not W4A4KV4Config(outlier_blocks=0).needs_calibration
    assert not W4A4KV4Config(outlier_blocks="all").needs_calibration


def _outlier_stats(in_features=300, channels=(5, 77, 140, 250), tokens=64, seed=0):
    """Activations with a few large channels scattered over the input, and their FMPQ statistics."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen)
    x[:, list(channels)] *= 60.0
    return x, InputStats(x.abs().amax(0), x)


def test_reordering_puts_the_outlier_channels_in_the_first_block_and_is_exact_in_float():
    x, stats = _outlier_stats()
    weight = torch.randn(40, 300)
    plan = plan_layer(weight, stats, 1, 128)
    assert sorted(plan.perm[:4].tolist()) == [5, 77, 140, 250]
    assert sorted(plan.perm.tolist()) == list(range(300)) and plan.a8_channels == BLOCK
    reordered = x[:, plan.perm] @ weight[:, plan.perm].t()
    assert max_rel_error(reordered, x @ weight.t()) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_auto_keeps_the_outlier_block_in_8_bits_and_cuts_the_error():
    x, stats = _outlier_stats()
    weight = torch.randn(40, 300)
    plan = plan_layer(weight, stats, "auto", 128)
    # 3 blocks: "auto" may keep 1 (a quarter, rounded); the outliers make block 0 worth it.
    assert plan.outlier_blocks == 1 and len(plan.errors) == 2
    assert plan.errors[1] <= AUTO_SLACK * plan.errors[-1] and plan.errors[0] > 10 * plan.errors[1]
    plain = plan_layer(weight, None, 0, 128)
    assert plain.a8_channels == 0 and torch.equal(plain.perm, torch.arange(300))

    def activation_error(layer_plan):  # against the same 4-bit weights with float activations
        module = W4AxLinear.from_linear(_linear(weight), layer_plan, 128)
        return max_rel_error(module(x), x @ module.dequantized_weight().t())

    assert activation_error(plan) < activation_error(plain) / 4


def test_fixed_layouts_and_missing_calibration():
    weight = torch.randn(8, 300)
    assert plan_layer(weight, None, "all", 128).a8_channels == 300
    assert plan_layer(weight, _outlier_stats()[1], 5, 128).a8_channels == 300  # capped at the layer
    with pytest.raises(ValueError, match="outlier_blocks=2 reorders channels from calibration statistics"):
        plan_layer(weight, None, 2, 128)


def _linear(weight, bias=None):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_module_computes_the_reference_in_the_original_channel_order(monkeypatch, backend, group_size):
    monkeypatch.setenv("HF_PLUGINS_BACKEND", backend)
    x, stats = _outlier_stats()
    weight, bias = torch.randn(40, 300), torch.randn(40)
    plan = plan_layer(weight, stats, "auto", group_size)
    module = W4AxLinear.from_linear(_linear(weight, bias), plan, group_size)
    out = module(x.reshape(4, 16, 300))
    codes, scales = quantize_weight(weight[:, plan.perm], group_size)
    expected = w4ax_linear_reference(x, plan.perm, plan.a8_channels, codes, scales, group_size, bias)
    assert out.shape == (4, 16, 40)
    assert max_rel_error(out.reshape(64, 40), expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    # The dequantized weight is in the original order: it is what a float linear would use.
    assert sqnr_db(module.dequantized_weight(), weight) > 15


def test_gradients_reach_the_input_straight_through():
    x, stats = _outlier_stats(tokens=8)
    weight = torch.randn(40, 300)
    module = W4AxLinear.from_linear(_linear(weight), plan_layer(weight, stats, 1, 128), 128)
    x = x.clone().requires_grad_(True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones(8, 40) @ module.dequantized_weight(), rtol=1e-5, atol=1e-5)


def test_quantize_reports_each_linear_and_records_the_layout():
    model, _ = tiny_model("llama")
    ids = random_token_ids(2, 8)
    before = model(ids).logits
    report = hf_plugins.quantize(model, W4A4KV4Config(outlier_blocks="auto", kv_bits=16),
                                 calibration_data=random_token_ids(4, 32))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, W4AxLinear) and report["model.layers.0.mlp.down_proj"]["outlier_blocks"] == 1
    assert all(len(entry["errors"]) == 2 for entry in report.values())
    assert sqnr_db(model(ids).logits, before) > 10
