"""The chunkwise CPU GLA (``hf_plugins.kernels.gla.cpu``) against the float64 recurrence: outputs, final states
and the gradients of q, k, v, gk and the initial state.

The CPU path allocates nothing for a kernel to fill (every tensor comes out of a torch op), so there is no
output buffer to poison; the checks assert finiteness instead.
"""

import pytest
import torch

from hf_plugins.kernels.gla import chunk_gla, fused_recurrent_gla
from hf_plugins.kernels.gla.cpu import CHUNK, chunk_gla_cpu
from tests.kernels.test_gla_reference import (
    GATES,
    assert_all_close,
    check_packed_matches_separate_runs,
    forward_backward,
    gla_inputs,
    oracle,
)
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

LENGTHS = [1, 15, CHUNK - 1, CHUNK, CHUNK + 1, 200]
HEAD_DIMS = [(16, 16), (32, 48), (64, 16)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("key_dim", "value_dim"), HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_chunk_matches_the_recurrence_forward_and_backward(T, gate, key_dim, value_dim):
    inputs = gla_inputs(2, T, 2, key_dim, value_dim, gate, seed=T * key_dim + value_dim)
    actual = forward_backward(chunk_gla_cpu, inputs, torch.float32)
    assert actual["o"].dtype == torch.float32 and actual["ht"].shape == (2, 2, key_dim, value_dim)
    assert_all_close(actual, oracle(inputs, torch.float32), torch.float32)


@pytest.mark.parametrize("T", [1, 65], ids=lambda t: f"T{t}")
def test_without_an_initial_state_starts_from_zeros(T):
    inputs = gla_inputs(2, T, 2, 16, 16, "strong", seed=T)
    actual = forward_backward(chunk_gla_cpu, inputs, torch.float32, with_state=False)
    assert_all_close(actual, oracle(inputs, torch.float32, with_state=False), torch.float32)


def test_float64_inputs_compute_in_float64():
    inputs = gla_inputs(1, 130, 2, 16, 8, "strong", seed=5)
    actual = forward_backward(chunk_gla_cpu, inputs, torch.float64)
    assert actual["ht"].dtype == torch.float64
    assert_all_close(actual, oracle(inputs, torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gate", GATES)
def test_half_precision_inputs_compute_in_float32(dtype, gate):
    inputs = gla_inputs(2, 100, 2, 32, 16, gate, seed=7)
    actual = forward_backward(chunk_gla_cpu, inputs, dtype)
    assert actual["o"].dtype == dtype and actual["dgk"].dtype == dtype and actual["ht"].dtype == torch.float32
    assert_all_close(actual, oracle(inputs, dtype), dtype)


@pytest.mark.parametrize("gate", ["extreme", "reset"])
def test_extreme_gates_stay_finite_and_exact(gate):
    # gate sums far below -88 (exp(-g) overflows fp32) and -inf resets: every exponent must stay <= 0
    inputs = gla_inputs(2, 150, 2, 16, 16, gate, seed=11)
    assert_all_close(forward_backward(chunk_gla_cpu, inputs, torch.float32), oracle(inputs, torch.float32),
                     torch.float32)


@pytest.mark.parametrize("lengths", [[CHUNK + 1, 0, 3, 2 * CHUNK], [1, 1], [200]], ids=str)
def test_packed_sequences_match_separate_runs(lengths):
    check_packed_matches_separate_runs(chunk_gla_cpu, lengths, value_dim=24)


@pytest.mark.parametrize(("prefill", "decode"), [(100, 3), (CHUNK, 1), (1, 5)], ids=str)
def test_prefill_then_decode_equals_one_pass(prefill, decode):
    inputs = gla_inputs(2, prefill + decode, 2, 16, 16, "strong", seed=prefill)
    args = [inputs[name].float() for name in ("q", "k", "v", "gk")]
    full, full_state = chunk_gla(*args, output_final_state=True)
    first, state = chunk_gla(*(x[:, :prefill] for x in args), output_final_state=True)
    rest, last_state = fused_recurrent_gla(*(x[:, prefill:] for x in args), initial_state=state,
                                           output_final_state=True)
    assert max_rel_error(torch.cat([first, rest], 1), full) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert max_rel_error(last_state, full_state) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("op", [chunk_gla, fused_recurrent_gla], ids=["chunk", "fused_recurrent"])
def test_dispatch_runs_every_backend_on_the_same_numbers(op):
    inputs = gla_inputs(1, 70, 2, 16, 16, "strong", seed=13)
    args = [inputs[name].float() for name in ("q", "k", "v", "gk")]
    state = inputs["h0"].float()
    outputs = {backend: op(*args, initial_state=state, output_final_state=True, backend=backend)
               for backend in ("reference", "cpu", "triton")}
    for backend in ("cpu", "triton"):
        for got, expected in zip(outputs[backend], outputs["reference"]):
            assert max_rel_error(got, expected) <= FLOAT_KERNEL_RTOL[torch.float32]
