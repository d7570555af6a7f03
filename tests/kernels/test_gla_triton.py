"""Triton GLA kernels (``hf_plugins.kernels.gla.triton``) against the float64 recurrence: forward, final states and
the backward kernels' gradients of q, k, v, gk and the initial state; the fused recurrent decode kernel.

On CPU they run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` first), at small
shapes; tests marked ``gpu`` run the GPU tilings at training shapes.
"""

import pytest
import torch

from hf_plugins.kernels.gla import chunk_gla, fused_recurrent_gla
from hf_plugins.kernels.gla import triton as gla_triton
from hf_plugins.kernels.gla.reference import gla_recurrence_reference
from hf_plugins.kernels.gla.triton import chunk_gla_triton, fused_recurrent_gla_triton
from tests.kernels.poison import poisoned_output
from tests.kernels.test_gla_reference import (
    GATES,
    assert_all_close,
    check_packed_matches_separate_runs,
    forward_backward,
    gla_inputs,
    oracle,
    packed_offsets,
)
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

LENGTHS = [1, 15, 63, 64, 65, 200]  # around the 64-token chunk (16/32 for shorter inputs)
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(gla_triton, "_new_output", poisoned_output)


pytestmark = pytest.mark.usefixtures("one_thread")


def _decode(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, with_state: bool = True,
            cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``fn`` forward only on the inputs cast to ``dtype`` -> ``{"o", "ht"}``."""
    args = [inputs[name].to(dtype) for name in ("q", "k", "v", "gk")]
    state = inputs["h0"].float() if with_state else None
    o, ht = fn(*args, inputs["q"].shape[-1] ** -0.5, state, True, cu_seqlens)
    return {"o": o, "ht": ht}


def _decode_oracle(inputs: dict[str, torch.Tensor], dtype: torch.dtype,
                   cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The float64 recurrence forward on q, k, v, gk rounded to ``dtype`` (the kernel's own inputs)."""
    rounded = {name: value.to(dtype).double() if name in ("q", "k", "v", "gk") else value
               for name, value in inputs.items()}
    return _decode(gla_recurrence_reference, rounded, torch.float64, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_chunk_matches_the_recurrence_forward_and_backward(T, gate):
    inputs = gla_inputs(2, T, 1, 32, 48, gate, seed=T)
    actual = forward_backward(chunk_gla_triton, inputs, torch.float32)
    assert actual["o"].dtype == torch.float32 and actual["ht"].shape == (2, 1, 32, 48)
    assert_all_close(actual, oracle(inputs, torch.float32), torch.float32)


@pytest.mark.parametrize(("key_dim", "value_dim"), [(16, 16), (64, 16), (80, 72)], ids=lambda d: f"d{d}")
def test_head_dims_including_several_key_and_value_blocks(key_dim, value_dim):
    # 80 and 72 take two 64-wide blocks each: the state tiles, key loops and value loops all split
    inputs = gla_inputs(1, 40, 2, key_dim, value_dim, "strong", seed=key_dim + value_dim)
    assert_all_close(forward_backward(chunk_gla_triton, inputs, torch.float32), oracle(inputs, torch.float32),
                     torch.float32)


def test_without_an_initial_state_starts_from_zeros():
    inputs = gla_inputs(2, 70, 1, 16, 16, "strong", seed=3)
    actual = forward_backward(chunk_gla_triton, inputs, torch.float32, with_state=False)
    assert "dh0" not in actual
    assert_all_close(actual, oracle(inputs, torch.float32, with_state=False), torch.float32)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_precision_inputs(dtype):
    inputs = gla_inputs(2, 70, 1, 32, 16, "strong", seed=4)
    actual = forward_backward(chunk_gla_triton, inputs, dtype)
    assert actual["o"].dtype == dtype and actual["dgk"].dtype == dtype and actual["ht"].dtype == torch.float32
    assert_all_close(actual, oracle(inputs, dtype), dtype)


@pytest.mark.parametrize("gate", ["extreme", "reset"])
def test_extreme_gates_stay_finite_and_exact(gate):
    # gate sums far below -88 (exp(-g) overflows fp32) and -inf resets: every exponent must stay <= 0
    inputs = gla_inputs(1, 100, 2, 16, 16, gate, seed=5)
    assert_all_close(forward_backward(chunk_gla_triton, inputs, torch.float32), oracle(inputs, torch.float32),
                     torch.float32)


@pytest.mark.parametrize("lengths", [[65, 0, 3, 17], [1, 1], [130]], ids=str)
def test_packed_sequences_match_separate_runs(lengths):
    check_packed_matches_separate_runs(chunk_gla_triton, lengths, value_dim=16)


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize(("T", "K", "V"), [(1, 16, 16), (5, 32, 48), (20, 80, 24)], ids=lambda x: str(x))
def test_fused_recurrent_matches_the_recurrence(T, K, V, with_state):
    inputs = gla_inputs(2, T, 2, K, V, "strong", seed=T * K)
    actual = _decode(fused_recurrent_gla_triton, inputs, torch.float32, with_state)
    expected = _decode(gla_recurrence_reference, inputs, torch.float64, with_state)
    assert_all_close(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_fused_recurrent_half_precision_and_packed_sequences(dtype):
    cu_seqlens = packed_offsets([3, 0, 1, 6])
    inputs = gla_inputs(1, 10, 2, 16, 16, "slow", seed=6, sequences=4)
    actual = _decode(fused_recurrent_gla_triton, inputs, dtype, cu_seqlens=cu_seqlens)
    assert actual["o"].dtype == dtype
    assert_all_close(actual, _decode_oracle(inputs, dtype, cu_seqlens), dtype)


@pytest.mark.parametrize(("prefill", "decode"), [(100, 3), (64, 1), (1, 4)], ids=str)
def test_prefill_then_decode_equals_one_pass(prefill, decode):
    inputs = gla_inputs(2, prefill + decode, 1, 16, 16, "strong", seed=prefill)
    args = [inputs[name].float() for name in ("q", "k", "v", "gk")]
    full, full_state = chunk_gla(*args, output_final_state=True, backend="triton")
    first, state = chunk_gla(*(x[:, :prefill] for x in args), output_final_state=True, backend="triton")
    rest, last_state = fused_recurrent_gla(*(x[:, prefill:] for x in args), initial_state=state,
                                           output_final_state=True, backend="triton")
    assert max_rel_error(torch.cat([first, rest], 1), full) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert max_rel_error(last_state, full_state) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_float64_inputs_are_refused_with_the_alternative():
    x = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="the triton GLA kernels take fp16, bf16 or fp32 q, k, v, got torch.float64"):
        chunk_gla(x, x, x, x, backend="triton")


def test_fused_recurrent_takes_the_chunk_kernels_when_gradients_are_needed():
    # the decode kernel has no backward: a call under autograd (an eval-mode model outside no_grad) must still
    # differentiate correctly
    inputs = gla_inputs(2, 5, 1, 16, 16, "strong", seed=8)
    actual = forward_backward(fused_recurrent_gla_triton, inputs, torch.float32)
    assert_all_close(actual, oracle(inputs, torch.float32), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("T", "key_dim", "value_dim"), [(2048, 128, 128), (1000, 64, 96)], ids=lambda x: str(x))
def test_gpu_chunk_matches_the_recurrence_at_training_shapes(T, key_dim, value_dim, dtype):
    inputs = {name: value.cuda() for name, value in
              gla_inputs(2, T, 4, key_dim, value_dim, "strong", seed=T).items()}
    inputs["gk"] = inputs["gk"] / 16  # the paper's gate normaliser: long memory at training lengths
    actual = forward_backward(chunk_gla_triton, inputs, dtype)
    assert_all_close(actual, oracle(inputs, dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_fused_recurrent_and_packed_chunk(dtype):
    cu_seqlens = packed_offsets([300, 1, 0, 1000]).cuda()
    inputs = {name: value.cuda() for name, value in gla_inputs(1, 1301, 4, 128, 128, "strong", seed=1,
                                                               sequences=4).items()}
    expected = _decode_oracle(inputs, dtype, cu_seqlens)
    for fn in (fused_recurrent_gla_triton, chunk_gla_triton):
        with torch.no_grad():
            assert_all_close(_decode(fn, inputs, dtype, cu_seqlens=cu_seqlens), expected, dtype)
