"""The W4Ax reference (``hf_plugins.kernels.w4ax_gemm.reference``): packing, quantizers and the scaled product."""

import pytest
import torch

from hf_plugins.kernels.w4ax_gemm.reference import (
    BLOCK,
    check_layout,
    pack_int4,
    quantize_activations,
    quantize_weight,
    round_half_away,
    unpack_int4,
    w4ax_linear_reference,
    w4ax_matmul_reference,
)
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error


@pytest.mark.parametrize("in_features", [1, 2, 7, 300])
def test_int4_packing_round_trips_every_code(in_features):
    codes = torch.randint(-8, 8, (3, in_features), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (3, -(-in_features // 2)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, in_features), codes)
    assert int(packed[0, 0]) & 15 == int(codes[0, 0]) + 8  # channel 0 in the low nibble, offset binary


def test_rounding_is_half_away_from_zero():
    values = torch.tensor([-2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 2.49])
    assert round_half_away(values).tolist() == [-3, -2, -1, 0, 0, 1, 2, 3, 2]


@pytest.mark.parametrize("a8_channels", [0, 128, 256, 300])
def test_activation_codes_stay_in_their_block_ranges_and_round_to_nearest(a8_channels):
    x = torch.randn(5, 300) * torch.linspace(0.1, 30, 300)
    codes, scales = quantize_activations(x, a8_channels)
    assert scales.shape == (5, 3)
    for block in range(3):
        part = slice(block * BLOCK, min((block + 1) * BLOCK, 300))
        limit = 127 if block * BLOCK < a8_channels else 7
        assert codes[:, part].abs().max() == limit  # the absmax maps to the limit
        error = (x[:, part] - codes[:, part].float() * scales[:, block, None]).abs()
        assert (error <= scales[:, block, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_weight_codes_are_symmetric_4_bit_and_round_to_nearest(group_size):
    weight = torch.randn(24, 300)
    codes, scales = quantize_weight(weight, group_size)
    group = 300 if group_size == -1 else group_size
    assert scales.shape == (24, -(-300 // group)) and codes.abs().max() == 7
    expanded = scales.repeat_interleave(group, dim=1)[:, :300]
    assert ((weight - codes.float() * expanded).abs() <= expanded / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("group_size", [64, 128, -1])
@pytest.mark.parametrize("a8_channels", [0, 128, 300])
def test_scaled_product_equals_the_dequantized_product(group_size, a8_channels):
    x = torch.randn(7, 300, dtype=torch.float64)
    weight = torch.randn(24, 300, dtype=torch.float64)
    x_codes, x_scales = quantize_activations(x, a8_channels)
    w_codes, w_scales = quantize_weight(weight, group_size)
    group = 300 if group_size == -1 else group_size
    x_hat = x_codes.double() * x_scales.double().repeat_interleave(BLOCK, dim=1)[:, :300]
    w_hat = w_codes.double() * w_scales.double().repeat_interleave(group, dim=1)[:, :300]
    out = w4ax_matmul_reference(x_codes, x_scales, w_codes, w_scales, group_size)
    assert out.dtype == torch.float32
    assert max_rel_error(out, x_hat @ w_hat.t()) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_the_linear_reads_permuted_channels_and_adds_the_bias():
    x = torch.randn(2, 3, 200)
    weight, bias = torch.randn(16, 200), torch.randn(16)
    perm = torch.randperm(200)
    w_codes, w_scales = quantize_weight(weight[:, perm], 128)
    out = w4ax_linear_reference(x, perm, 128, w_codes, w_scales, 128, bias)
    x_codes, x_scales = quantize_activations(x.reshape(6, 200)[:, perm], 128)
    expected = w4ax_matmul_reference(x_codes, x_scales, w_codes, w_scales, 128) + bias
    assert out.shape == (2, 3, 16) and torch.equal(out.reshape(6, 16), expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((300, 100, 128), r"a8_channels must be a multiple of 128 in 0\.\.300 \(or all 300 channels\), got 100"),
        ((300, 384, 128), r"a8_channels must be a multiple of 128 in 0\.\.300"),
        ((300, 128, 32), r"group_size must be one of \(64, 128, -1\), got 32"),
    ],
)
def test_layout_errors_name_the_constraint(args, message):
    with pytest.raises(ValueError, match=message):
        check_layout(*args)
