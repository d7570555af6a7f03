"""Triton bit-plane kernels (``hf_plugins.kernels.bitplane_gemm.triton``) against the integer-exact reference.

On CPU they run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` first); tests marked
``gpu`` run the autotuned tilings at model shapes.
"""

import itertools

import pytest
import torch

from hf_plugins.kernels.bitplane_gemm import triton as bitplane_triton
from hf_plugins.kernels.bitplane_gemm.reference import (
    bipolar_linear_reference,
    bit_planes,
    codes_to_bipolar,
    pack_for_triton,
    pack_planes,
    quantize_activations,
    unpack_planes,
)
from hf_plugins.kernels.bitplane_gemm.triton import (
    BitplaneConfig,
    bipolar_linear_triton,
    bitplane_matmul_triton,
    quantize_activation_chunks,
)
from hf_plugins.quantizers.bipolar.modules import BipolarIntLinear
from hf_plugins.quantizers.bipolar.weights import quantize_weight_bipolar
from tests.kernels.poison import poisoned_output
from tests.tolerances import FLOAT_KERNEL_RTOL, assert_close_kernel, max_rel_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(bitplane_triton, "_new_output", poisoned_output)


def _random_bipolar(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    return codes_to_bipolar(codes, bits)


def test_triton_layout_holds_each_planes_bits_by_word():
    values = _random_bipolar(24, 100, 3, seed=0)
    planes = pack_planes(bit_planes(values, 3))
    words = pack_for_triton(planes)  # [bits, ceil(K/32), N]
    assert words.shape == (3, 4, 24) and words.dtype == torch.int32
    k = torch.arange(100)
    bits = (words[:, k // 32, :] >> (k % 32)[None, :, None]) & 1  # [bits, K, N]
    assert torch.equal(2 * bits.transpose(1, 2) - 1, unpack_planes(planes, 100).long())


CHUNKINGS = (1, 3, 7)


@pytest.mark.parametrize("planes_per_chunk", CHUNKINGS)
@pytest.mark.parametrize("w_bits, a_bits", list(itertools.product(range(1, 9), range(1, 9))))
def test_decomposition_and_recovery_are_integer_exact(w_bits, a_bits, planes_per_chunk):
    a = _random_bipolar(5, 100, a_bits, seed=a_bits)
    w = _random_bipolar(24, 100, w_bits, seed=10 + w_bits)
    words = pack_for_triton(pack_planes(bit_planes(w, w_bits)))
    product = bitplane_matmul_triton(a, a_bits, words, w_bits, planes_per_chunk)
    assert product.dtype == torch.int32
    assert torch.equal(product.long(), a.long() @ w.long().t())


def test_several_tiles_in_every_dimension_are_exact():
    a, w = _random_bipolar(37, 200, 8, seed=1), _random_bipolar(40, 200, 8, seed=2)
    words = pack_for_triton(pack_planes(bit_planes(w, 8)))
    config = BitplaneConfig(block_m=16, block_n=16, block_k=32)  # 3 x 3 output tiles, 7 K tiles, a ragged one
    assert torch.equal(bitplane_matmul_triton(a, 8, words, 8, 3, config).long(), a.long() @ w.long().t())


@pytest.mark.parametrize("planes_per_chunk", [1, 7])
@pytest.mark.parametrize("a_bits", range(1, 9))
def test_activation_quantizer_kernel_equals_the_reference(a_bits, planes_per_chunk):
    x = torch.randn(6, 300)
    x[0, :6] = torch.tensor([7.0, 2.0, -2.0, 0.0, -0.0, 4.0])  # exact ties between odd levels when scale is 1
    x[0, 6:] = 0.5
    chunks, scales = quantize_activation_chunks(x, a_bits, planes_per_chunk)
    values, expected_scales = quantize_activations(x, a_bits)
    recovered = sum(chunks[c].long() << (c * planes_per_chunk) for c in range(chunks.shape[0]))
    assert torch.equal(scales, expected_scales.squeeze(-1))
    assert torch.equal(recovered, values.long())


def _layer(w_bits: int, group_size: int, in_features: int = 100, out_features: int = 40):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(w_bits))
    return quantize_weight_bipolar(weight, w_bits, group_size)


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_bits, act_bits", [(2, None), (5, None), (8, None), (2, 2), (3, 8), (8, 4)])
def test_linear_matches_the_reference(w_bits, act_bits, dtype, group_size):
    planes, scales, offsets = _layer(w_bits, group_size)  # in_features 100: a partial last group of 4
    x = torch.randn(2, 5, 100).to(DTYPES[dtype])
    bias = torch.randn(40)
    y = bipolar_linear_triton(x, pack_for_triton(planes), scales, offsets, 100, group_size, act_bits, bias)
    expected = bipolar_linear_reference(x.double(), planes, scales, offsets, 100, group_size, act_bits,
                                        bias.double())
    assert y.shape == (2, 5, 40) and y.dtype == DTYPES[dtype]
    assert_close_kernel(y, expected, DTYPES[dtype])


@pytest.mark.parametrize("planes_per_chunk", [1, 4])
def test_linear_with_one_dot_per_plane_pair_matches(planes_per_chunk):
    planes, scales, offsets = _layer(3, 32)
    x = torch.randn(7, 100)
    y = bipolar_linear_triton(x, pack_for_triton(planes), scales, offsets, 100, 32, 5,
                              planes_per_chunk=planes_per_chunk, config=BitplaneConfig(block_k=32))
    assert_close_kernel(y, bipolar_linear_reference(x.double(), planes, scales, offsets, 100, 32, 5), torch.float32)


@pytest.mark.parametrize("w_bits, a_bits", [(3, None), (4, None), (6, None), (3, 4), (8, 8)])
def test_module_on_the_triton_backend_matches_the_reference(w_bits, a_bits, monkeypatch):
    """W<=4 weight-only goes through AWQ's Triton kernels, the rest through the bit-plane kernels."""
    torch.manual_seed(w_bits)
    layer = BipolarIntLinear.from_linear(torch.nn.Linear(128, 64), w_bits, a_bits, 32)
    x = torch.randn(3, 128)
    monkeypatch.setenv("HF_PLUGINS_BACKEND", "reference")
    expected = layer(x)
    monkeypatch.setenv("HF_PLUGINS_BACKEND", "triton")
    assert max_rel_error(layer(x), expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert (layer._words is not None) == (a_bits is not None or w_bits > 4)


def test_bad_arguments_raise_with_the_fix():
    planes, scales, offsets = _layer(3, 32)
    words, x = pack_for_triton(planes), torch.randn(2, 100)
    with pytest.raises(ValueError, match=r"block_k must be a power of two >= 32 .* got 16"):
        bipolar_linear_triton(x, words, scales, offsets, 100, 32, None, config=BitplaneConfig(block_k=16))
    with pytest.raises(ValueError, match=r"block_k=64 must divide the group size 32"):
        bipolar_linear_triton(x, words, scales, offsets, 100, 32, None, config=BitplaneConfig(block_k=64))
    with pytest.raises(ValueError, match=r"planes_per_chunk must be an int in 1\.\.7 .* got 8"):
        bipolar_linear_triton(x, words, scales, offsets, 100, 32, 4, planes_per_chunk=8)
    with pytest.raises(ValueError, match=r"a_bits must be an int in 1\.\.8, got 9"):
        bipolar_linear_triton(x, words, scales, offsets, 100, 32, 9)
    with pytest.raises(TypeError, match=r"fp16, bf16 or fp32 activations, got torch.float64"):
        bipolar_linear_triton(x.double(), words, scales, offsets, 100, 32, None)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("w_bits, act_bits", [(2, None), (3, None), (8, None), (2, 2), (4, 4), (8, 8)])
def test_gpu_tilings_at_model_shapes(M, w_bits, act_bits):
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    planes, scales, offsets = quantize_weight_bipolar(weight, w_bits, 128)
    x = torch.randn(M, 4096).half()
    y = bipolar_linear_triton(x.cuda(), pack_for_triton(planes.cuda()), scales.cuda(), offsets.cuda(), 4096, 128,
                              act_bits)
    expected = bipolar_linear_reference(x.double(), planes, scales, offsets, 4096, 128, act_bits)
    assert_close_kernel(y.cpu(), expected, torch.float16)
