"""BipolarIntLinear: lossless conversion of the integer grid, exact W+A integer products, quality by bit width."""

import pytest
import torch
from torch import nn

from hf_plugins.kernels.bitplane_gemm.reference import bit_planes, bitplane_matmul_reference, quantize_activations
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
    expected = fake_quantize(linear.weight.detach(), w_bits, group_size, scale_dtype=torch.float32)
    assert max_rel_error(layer.dequantized_weight(), expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    values = layer.bipolar_values()
    assert bool((values % 2 != 0).all()) and int(values.abs().max()) <= 2**w_bits - 1


def test_weight_only_forward_is_a_linear_with_the_dequantized_weight():
    linear = _linear()
    layer = BipolarIntLinear.from_linear(linear, 3, None, 32)
    x = torch.randn(2, 5, 100)
    expected = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    assert max_rel_error(layer(x), expected) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("w_bits, a_bits", [(1, 1), (2, 2), (2, 4), (3, 8), (4, 4), (8, 8)])
def test_weight_and_activation_path_equals_the_bit_plane_decomposition(w_bits, a_bits):
    linear = _linear(in_features=64, bias=False)
    layer = BipolarIntLinear.from_linear(linear, w_bits, a_bits, 32)
    x = torch.randn(3, 64)
    x_values, x_scale = quantize_activations(x, a_bits)
    weight_values = layer.bipolar_values()
    expected = torch.zeros(3, 24, dtype=torch.float64)
    for g in range(2):  # per group: exact integer products from the planes, then scales and offsets
        cols = slice(32 * g, 32 * (g + 1))
        integer = bitplane_matmul_reference(bit_planes(x_values[:, cols], a_bits), bit_planes(weight_values[:, cols], w_bits))
        expected += integer.double() * layer.scales[g].double() + x_values[:, cols].sum(-1, keepdim=True).double() * layer.offsets[g].double()
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


def test_state_dict_round_trip_is_bit_identical():
    layer = BipolarIntLinear.from_linear(_linear(), 3, 4, 32)
    clone = BipolarIntLinear(100, 24, 3, 4, 32, bias=True)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, 100)
    assert torch.equal(clone(x), layer(x))


def test_bad_bits_raise_with_the_range():
    with pytest.raises(ValueError, match=r"BipolarIntLinear\.w_bits must be an int in 1\.\.8, got 9"):
        BipolarIntLinear(8, 8, 9, None, 8, bias=False)
    with pytest.raises(ValueError, match=r"BipolarIntLinear\.a_bits must be an int in 1\.\.8, got 0"):
        BipolarIntLinear(8, 8, 4, 0, 8, bias=False)
