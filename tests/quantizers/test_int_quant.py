"""Group-wise INT quantization: scales exact in fp16 and bf16, codes in range, error within the SQNR floors."""

import pytest
import torch

from hf_plugins.quantizers.awq.int_quant import dequantize_groupwise, fake_quantize, quantize_groupwise
from tests.tolerances import SQNR_FLOOR_DB, sqnr_db


@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e-6], ids=["normal", "small", "fp16-subnormal-scales"])
def test_scales_are_exact_in_fp16_and_bf16(magnitude):
    weight = torch.randn(48, 200) * magnitude
    _, scales, _ = quantize_groupwise(weight, 4, 64)
    assert torch.equal(scales.half().float(), scales)
    assert torch.equal(scales.bfloat16().float(), scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128], ids=lambda g: f"g{g}")
def test_codes_in_range_and_error_within_floor(bits, group_size):
    weight = torch.randn(64, 200, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros = quantize_groupwise(weight, bits, group_size)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert zeros.min() >= 0 and zeros.max() <= 2**bits - 1
    assert sqnr_db(fake_quantize(weight, bits, group_size), weight) >= SQNR_FLOOR_DB[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_quantize_is_bit_identical_to_quantize_then_dequantize(bits, group_size, dtype):
    """The searches' fused fake quantizer must round exactly as the packed weights will (partial last group: 200)."""
    weight = (torch.randn(37, 200, generator=torch.Generator().manual_seed(bits)) * 0.05).to(dtype)
    codes, scales, zeros = quantize_groupwise(weight, bits, group_size)
    expected = dequantize_groupwise(codes, scales, zeros, group_size).to(dtype)
    assert torch.equal(fake_quantize(weight, bits, group_size), expected)
