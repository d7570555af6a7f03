"""Attention over a packed 4-bit KV cache: the Triton kernel (under the interpreter) and the CPU path against the
float64 reference, on odd shapes, both code kinds, grouped-query heads, masks and several token splits."""

import pytest
import torch

from hf_plugins.kernels.kv4_attention import (
    PackedKV,
    dequantize_packed,
    kv4_attention,
    kv4_attention_cpu,
    kv4_attention_reference,
)
from hf_plugins.kernels.kv4_attention import triton as kv4_triton
from hf_plugins.kernels.kv4_attention.triton import kv4_attention_triton
from hf_plugins.kernels.w4ax_gemm.reference import pack_int4
from tests.kernels.poison import poisoned_output
from tests.tolerances import FLOAT_KERNEL_RTOL, assert_close_kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kv4_triton, "_new_output", poisoned_output)


def random_packed(batch, kv_heads, tokens, head_dim, group_size, symmetric, generator, shared_scale=False):
    """Random nibbles and positive fp16 scales (one per channel for every token when ``shared_scale``)."""
    codes = torch.randint(-8, 8, (batch, kv_heads, tokens, head_dim), generator=generator)
    scale_tokens = 1 if shared_scale else tokens
    scale = (torch.rand(batch, kv_heads, scale_tokens, head_dim // group_size, generator=generator) + 0.1).half()
    minimum = None
    if not symmetric:
        minimum = (torch.randn(batch, kv_heads, scale_tokens, head_dim // group_size, generator=generator)).half()
    return PackedKV(pack_int4(codes), scale / 4, minimum, group_size, torch.float32)


CASES = [  # (batch, heads, kv_heads, queries, tokens, head_dim, key groups, value groups, symmetric keys)
    (1, 2, 2, 1, 37, 64, 32, 64, False),
    (2, 6, 2, 1, 200, 64, 64, 64, True),
    (3, 4, 1, 5, 70, 32, 16, 32, False),
    (1, 14, 2, 4, 129, 64, 1, 64, True),
    (2, 2, 2, 3, 3, 128, 32, 64, False),
]


def _inputs(case, dtype, seed):
    batch, heads, kv_heads, queries, tokens, head_dim, k_group, v_group, k_sym = case
    gen = torch.Generator().manual_seed(seed)
    key = random_packed(batch, kv_heads, tokens, head_dim, k_group, k_sym, gen, shared_scale=k_group == 1)
    value = random_packed(batch, kv_heads, tokens, head_dim, v_group, False, gen)
    query = torch.randn(batch, heads, queries, head_dim, generator=gen).to(dtype)
    return query, key, value


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}q{}t{}d{}-kg{}vg{}{}".format(
    *c[:-1], "-sym" if c[-1] else ""))
def test_triton_matches_reference_causal(case, dtype):
    query, key, value = _inputs(case, dtype, seed=sum(case))
    expected = kv4_attention_reference(query, key, value)
    for splits in (1, 3):
        assert_close_kernel(kv4_attention_triton(query, key, value, num_splits=splits, block_n=16), expected, dtype)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"b{c[0]}h{c[1]}q{c[3]}t{c[4]}")
def test_triton_matches_reference_with_padding_mask(case):
    query, key, value = _inputs(case, torch.float32, seed=7)
    batch, queries, tokens = query.shape[0], query.shape[2], key.shape[2]
    causal = torch.ones(queries, tokens, dtype=torch.bool).tril(tokens - queries)
    mask = causal.expand(batch, 1, queries, tokens).clone()
    mask[-1, :, :, : tokens // 3] = False  # a left-padded row
    mask[0, :, 0, :] = False  # a query that sees nothing gets zeros
    expected = kv4_attention_reference(query, key, value, mask)
    out = kv4_attention_triton(query, key, value, mask, num_splits=2, block_n=16)
    assert_close_kernel(out, expected, torch.float32)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))


def test_per_head_mask_and_scale():
    query, key, value = _inputs(CASES[2], torch.float32, seed=3)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(query.shape[0], query.shape[1], query.shape[2], key.shape[2] + 4, generator=gen) > 0.3
    expected = kv4_attention_reference(query, key, value, mask, scale=0.3)
    assert_close_kernel(kv4_attention_triton(query, key, value, mask, scale=0.3, block_n=32), expected,
                        torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_matches_reference(dtype):
    query, key, value = _inputs(CASES[3], dtype, seed=11)
    mask = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool).tril(key.shape[2] - query.shape[2])
    mask[..., :5] = False
    assert_close_kernel(kv4_attention_cpu(query, key, value, mask), kv4_attention_reference(query, key, value, mask),
                        dtype)


def test_reference_equals_dense_softmax_attention():
    """The oracle itself: dequantize, then plain softmax attention written out per head."""
    query, key, value = _inputs(CASES[1], torch.float64, seed=5)
    k, v = dequantize_packed(key, torch.float64), dequantize_packed(value, torch.float64)
    out = kv4_attention_reference(query, key, value)
    b, h = 1, 4  # query head 4 reads kv head 4 // 3 = 1
    scores = query[b, h] @ k[b, h // 3].t() / 8.0
    expected = torch.softmax(scores, -1) @ v[b, h // 3]
    assert torch.allclose(out[b, :, h], expected, rtol=FLOAT_KERNEL_RTOL[torch.float64], atol=0)


def test_dequantize_packed_formulas():
    codes = torch.tensor([[[[0, 15, 7, 8]]]]) - 8
    scale = torch.tensor([[[[0.5, 2.0]]]]).half()
    minimum = torch.tensor([[[[1.0, -1.0]]]]).half()
    asym = dequantize_packed(PackedKV(pack_int4(codes), scale, minimum, 2, torch.float32))
    sym = dequantize_packed(PackedKV(pack_int4(codes), scale, None, 2, torch.float32))
    assert asym.flatten().tolist() == [1.0, 8.5, 13.0, 15.0]
    assert sym.flatten().tolist() == [-4.0, 3.5, -2.0, 0.0]


def test_dispatch_and_errors():
    query, key, value = _inputs(CASES[0], torch.float32, seed=1)
    assert torch.equal(kv4_attention(query, key, value, backend="cpu"), kv4_attention_cpu(query, key, value))
    with pytest.raises(TypeError, match="boolean mask"):
        kv4_attention(query, key, value, torch.zeros(1, 1, 1, 37), backend="reference")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kv4_attention_triton(query[:, :1].expand(1, 3, 1, 64), key, value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("queries", [1, 4])
def test_gpu_llama_8b_shapes(dtype, queries):
    """32 query heads over 8 kv heads of dimension 128, 4099 cached tokens, the default split heuristic."""
    gen = torch.Generator().manual_seed(queries)
    key = random_packed(3, 8, 4099, 128, 32, False, gen)
    value = random_packed(3, 8, 4099, 128, 64, False, gen)
    key, value = (PackedKV(p.codes.cuda(), p.scale.cuda(), p.minimum.cuda(), p.group_size, dtype) for p in (key, value))
    query = torch.randn(3, 32, queries, 128, generator=gen).to(dtype).cuda()
    assert_close_kernel(kv4_attention_triton(query, key, value), kv4_attention_reference(query, key, value), dtype)
