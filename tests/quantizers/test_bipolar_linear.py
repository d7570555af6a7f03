"""BipolarIntLinear: lossless conversion of the integer grid, exact W+A integer products, quality by bit width."""

import pytest
import torch
from torch import nn

from hf_plugins.kernels.bitplane_gemm.reference import (
    bit_planes,
    bitplane_matmul_reference,
    quantize_activations,
)
from hf_plugins.quantizers.awq.int_quant import fake_quantize
from hf_plugins.quantizers.bipolar.modules import BipolarIntLinear
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error, sqnr_db


def _linear(in_features=100, out_features=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_bipolar_weights_are_the_integer_grid_rewritten_losslessly(w_bits, group_size):
    linear = _linear()  # in_features=100: a partial last group of 4 with groups of 32
    layer = BipolarIntLinear.from_linear(linear, w_bits, None, group_size)
    expected = fake_quantize(linear.weight.detach(), w_bits, group_size)
    assert max_rel_error(layer.dequantized_weight(), expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    values = layer.bipolar_values()
    assert bool((values % 2 != 0).all()) and int(values.abs().max()) <= 2**w_bits - 1


@pytest.fixture
def reference_backend(monkeypatch):
    """The exact reference path, whose semantics these tests pin down (the kernels are compared with it)."""
    monkeypatch.setenv("HF_PLUGINS_BACKEND", "reference")


def test_weight_only_forward_is_a_linear_with_the_dequantized_weight(reference_backend):
    linear = _linear()
    layer = BipolarIntLinear.from_linear(linear, 3, None, 32)
    x = torch.randn(2, 5, 100)
    expected = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    assert max_rel_error(layer(x), expected) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("w_bits, a_bits", [(1, 1), (2, 2), (2, 4), (3, 8), (4, 4), (8, 8)])
def test_weight_and_activation_path_equals_the_bit_plane_decomposition(w_bits, a_bits, reference_backend):
    linear = _linear(in_features=64, bias=False)
    layer = BipolarIntLinear.from_linear(linear, w_bits, a_bits, 32)
    x = torch.randn(3, 64)
    x_values, x_scale = quantize_activations(x, a_bits)
    weight_values = layer.bipolar_values()
    expected = torch.zeros(3, 24, dtype=torch.float64)
    for g in range(2):  # per group: exact integer products from the planes, then scales and offsets
        cols = slice(32 * g, 32 * (g + 1))
        x_planes, w_planes = bit_planes(x_values[:, cols], a_bits), bit_planes(weight_values[:, cols], w_bits)
        integer = bitplane_matmul_reference(x_planes, w_planes).double()
        row_sums = x_values[:, cols].sum(-1, keepdim=True).double()
        expected += integer * layer.scales[g].double() + row_sums * layer.offsets[g].double()
    expected *= x_scale.double()
    assert max_rel_error(layer(x), expected) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_quality_rises_with_bits():
    linear = _linear(in_features=256, out_features=64, bias=False)
    x = torch.randn(16, 256)
    exact = linear(x).detach()
    weight_only = [sqnr_db(BipolarIntLinear.from_linear(linear, bits, None, 64)(x), exact) for bits in (2, 3, 4, 8)]
    assert weight_only == sorted(weight_only) and weight_only[-1] > 40
    with_activations = [sqnr_db(BipolarIntLinear.from_linear(linear, 8, bits, 64)(x), exact) for bits in (2, 4, 8)]
    assert with_activations == sorted(with_activations) and with_activations[-1] > 30


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_activation_rounding_passes_gradients_straight_through(backend, monkeypatch):
    monkeypatch.setenv("HF_PLUGINS_BACKEND", backend)
    layer = BipolarIntLinear.from_linear(_linear(in_features=64, bias=False), 4, 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    grad_out = torch.randn(3, 24)
    y = layer(x)
    y.backward(grad_out)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the value is the quantized output, untouched by the estimator
    assert max_rel_error(x.grad, grad_out @ layer.dequantized_weight()) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_state_dict_round_trip_is_bit_identical():
    layer = BipolarIntLinear.from_linear(_linear(), 3, 4, 32)
    clone = BipolarIntLinear(100, 24, 3, 4, 32, bias=True)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, 100)
    assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("w_bits", [3, 7])
def test_cpu_layers_hold_only_the_prepacked_form_and_checkpoint_the_planes(w_bits):
    layer = BipolarIntLinear.from_linear(_linear(in_features=128, out_features=64), w_bits, None, 32)
    planes = layer.qweight.clone()
    x = torch.randn(2, 128)
    y = layer(x)
    assert layer.qweight.numel() == 0  # the planes are not kept beside the int4 form
    assert torch.equal(layer.state_dict()["qweight"], planes)
    assert torch.equal(layer.planes(), planes)
    layer.to(torch.float64).to(torch.float32)  # a move restores the buffer, and the next call prepacks again
    assert torch.equal(layer.qweight, planes)
    assert torch.equal(layer(x), y)


def test_odd_input_widths_keep_the_reference_path():
    linear = _linear(in_features=99, out_features=16)
    layer = BipolarIntLinear.from_linear(linear, 4, None, 32)
    x = torch.randn(2, 99)
    assert max_rel_error(layer(x), nn.functional.linear(x, layer.dequantized_weight(), linear.bias)) <= 2e-5
    assert layer._cpu_weight is None


def test_bad_bits_raise_with_the_range():
    with pytest.raises(ValueError, match=r"BipolarIntLinear\.w_bits must be an int in 1\.\.8, got 9"):
        BipolarIntLinear(8, 8, 9, None, 8, bias=False)
    with pytest.raises(ValueError, match=r"BipolarIntLinear\.a_bits must be an int in 1\.\.8, got 0"):
        BipolarIntLinear(8, 8, 4, 0, 8, bias=False)


def test_lora_learns_through_activation_quantized_layers():
    from peft import LoraConfig, get_peft_model

    import hf_plugins
    from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_model

    model = tiny_model("llama")[0]
    hf_plugins.quantize(model, hf_plugins.BipolarIntConfig(w_bits=4, a_bits=8, group_size=32))
    lora = hf_plugins.register_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    prompt = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = peft_model(prompt, labels=prompt).loss
        loss.backward()
        # The lowest layer's adapters get a gradient across the activation-quantized layers above them.
        lowest = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert lowest.lora_B["default"].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_w4_bipolar_with_awq_search_is_awq_w4_rewritten(monkeypatch):
    import copy

    import hf_plugins
    from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_model

    monkeypatch.setenv("HF_PLUGINS_BACKEND", "reference")  # AWQ's exact fp32 kernel, like the bipolar reference
    float_model = tiny_model("qwen2")[0]
    calibration = torch.randint(3, VOCAB_SIZE, (4, 32), generator=torch.Generator().manual_seed(1))
    awq, bipolar = copy.deepcopy(float_model), copy.deepcopy(float_model)
    hf_plugins.quantize(awq, hf_plugins.AwqConfig(bits=4, group_size=32, clip=False), calibration_data=calibration)
    hf_plugins.quantize(bipolar, hf_plugins.BipolarIntConfig(w_bits=4, group_size=32, scale_search="awq", clip=False),
                        calibration_data=calibration)
    prompt = torch.randint(3, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_rel_error(bipolar(prompt).logits, awq(prompt).logits) <= FLOAT_KERNEL_RTOL[torch.float32]
        assert sqnr_db(bipolar(prompt).logits, float_model(prompt).logits) > 12


@pytest.mark.parametrize("w_bits, a_bits", [(2, None), (3, None), (4, None), (6, None), (8, None), (3, 4), (8, 8)])
def test_cpu_path_runs_the_int4_kernels_on_the_same_weights(w_bits, a_bits, monkeypatch):
    linear = _linear(in_features=128, out_features=64)
    layer = BipolarIntLinear.from_linear(linear, w_bits, a_bits, 32)
    assert (layer.awq_form() is not None) == (w_bits <= 4)
    x = torch.randn(3, 7, 128)
    fast = layer(x)
    assert layer._cpu_weight.chunks == -(-w_bits // 4)  # the prepacked int4 form served the call
    monkeypatch.setenv("HF_PLUGINS_BACKEND", "reference")
    exact = layer(x)
    assert max_rel_error(fast, exact) <= FLOAT_KERNEL_RTOL[torch.bfloat16]  # the int4 kernel runs bf16 activations


def test_layers_without_an_awq_form_keep_the_reference_path():
    assert BipolarIntLinear.from_linear(_linear(in_features=64, out_features=24), 5, None, 32).awq_form() is None
    assert BipolarIntLinear.from_linear(_linear(in_features=64, out_features=20), 4, None, 32).awq_form() is None
    layer = BipolarIntLinear.from_linear(_linear(in_features=64, out_features=24), 4, None, 32)
    layer.offsets += 0.3 * layer.scales  # offsets off the integer grid
    layer._release_caches()
    assert layer.awq_form() is None
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
    assert layer._cpu_weight is None
