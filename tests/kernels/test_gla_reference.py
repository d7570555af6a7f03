"""The GLA reference recurrence (``hf_plugins.kernels.gla.reference``) against closed forms, and input checks.

Also home of the GLA case helpers the cpu and triton tests share (:func:`gla_inputs`, :func:`forward_backward`).
"""

import pytest
import torch
import torch.nn.functional as F

from hf_plugins.kernels.gla import chunk_gla, fused_recurrent_gla
from hf_plugins.kernels.gla.reference import gla_recurrence_reference
from tests.tolerances import FLOAT_KERNEL_RTOL, assert_close_kernel, max_rel_error

GATES = ("slow", "strong")


pytestmark = pytest.mark.usefixtures("one_thread")


def gate_values(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float64 log forget gates: ``slow`` in (-0.05, 0] (long memory); ``strong`` ``logsigmoid(8 N(0, 1))``
    clamped at -20 (a mix of ~0 and ~-20: chunk gate sums reach -1000, which overflow ``exp(-g)``); ``extreme``
    down to -1000; ``reset`` ``logsigmoid(N(0, 1))`` with one gate in ten ``-inf`` (a hard reset)."""
    if kind == "slow":
        return -0.05 * torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "strong":
        return F.logsigmoid(8 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp_min(-20)
    if kind == "extreme":
        return -1000 * torch.rand(shape, generator=generator, dtype=torch.float64)
    gates = F.logsigmoid(torch.randn(shape, generator=generator, dtype=torch.float64))
    return gates.masked_fill(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.1, float("-inf"))


def gla_inputs(batch: int, seq: int, heads: int, key_dim: int, value_dim: int, gate: str, seed: int,
               sequences: int | None = None) -> dict[str, torch.Tensor]:
    """Fresh float64 ``q, k, gk [batch, seq, heads, key_dim]``, ``v``, the upstream gradients ``do`` (like ``v``)
    and ``dht`` and the initial state ``h0`` (both ``[sequences or batch, heads, key_dim, value_dim]``)."""
    gen = torch.Generator().manual_seed(seed)
    qk_shape, v_shape = (batch, seq, heads, key_dim), (batch, seq, heads, value_dim)
    state_shape = (sequences or batch, heads, key_dim, value_dim)
    return {
        "q": torch.randn(qk_shape, generator=gen, dtype=torch.float64),
        "k": torch.randn(qk_shape, generator=gen, dtype=torch.float64),
        "v": torch.randn(v_shape, generator=gen, dtype=torch.float64),
        "gk": gate_values(gate, qk_shape, gen),
        "h0": torch.randn(state_shape, generator=gen, dtype=torch.float64),
        "do": torch.randn(v_shape, generator=gen, dtype=torch.float64),
        "dht": torch.randn(state_shape, generator=gen, dtype=torch.float64),
    }


def forward_backward(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, with_state: bool = True,
                     cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run ``fn(q, k, v, gk, scale, initial_state, True, cu_seqlens)`` on the inputs cast to ``dtype`` (the state
    in float32, float64 for float64) and back-propagate ``sum(o * do) + sum(final * dht)``.

    Returns ``o, ht`` and the gradients ``dq, dk, dv, dgk`` and (``with_state``) ``dh0``.
    """
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v", "gk")}
    h0 = inputs["h0"].detach().to(state_dtype).requires_grad_() if with_state else None
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves["gk"], inputs["q"].shape[-1] ** -0.5, h0, True,
               cu_seqlens)
    loss = (o.double() * inputs["do"]).sum() + (ht.double() * inputs["dht"]).sum()
    loss.backward()
    result = {"o": o.detach(), "ht": ht.detach()}
    result.update({f"d{name}": leaf.grad for name, leaf in leaves.items()})
    if with_state:
        result["dh0"] = h0.grad
    return result


def oracle(inputs: dict[str, torch.Tensor], dtype: torch.dtype, with_state: bool = True,
           cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`forward_backward` of the float64 reference on the inputs rounded to ``dtype`` first (a half-precision
    kernel is judged on its own inputs)."""
    rounded = {name: value.to(dtype).double() if name in ("q", "k", "v", "gk") else value
               for name, value in inputs.items()}
    return forward_backward(gla_recurrence_reference, rounded, torch.float64, with_state, cu_seqlens)


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype: torch.dtype,
                     rtol: float | None = None) -> None:
    """Every output and gradient within ``rtol`` (default: the table's ``dtype`` entry), named on failure."""
    rtol = FLOAT_KERNEL_RTOL[dtype] if rtol is None else rtol
    errors = {name: max_rel_error(actual[name], expected[name]) for name in expected}
    finite = {name: bool(torch.isfinite(actual[name]).all()) for name in expected}
    assert all(finite.values()), f"non-finite values in {[n for n, ok in finite.items() if not ok]}"
    assert max(errors.values()) <= rtol, f"max rel errors {errors} exceed {rtol:.1e}"


def packed_offsets(lengths: list[int]) -> torch.Tensor:
    """int64 ``cu_seqlens`` ``[0, l0, l0 + l1, ...]``."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def check_packed_matches_separate_runs(fn, lengths: list[int], value_dim: int) -> None:
    """``fn`` (a chunk implementation) on sequences of ``lengths`` packed with ``cu_seqlens``: forward, final
    states and gradients match the float32 oracle, and each sequence matches a separate call."""
    cu_seqlens = packed_offsets(lengths)
    inputs = gla_inputs(1, sum(lengths), 2, 16, value_dim, "strong", seed=len(lengths), sequences=len(lengths))
    packed = forward_backward(fn, inputs, torch.float32, cu_seqlens=cu_seqlens)
    assert_all_close(packed, oracle(inputs, torch.float32, cu_seqlens=cu_seqlens), torch.float32)
    offsets = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        piece = {name: value[i:i + 1] if name in ("h0", "dht") else value[:, start:end]
                 for name, value in inputs.items()}
        alone = forward_backward(fn, piece, torch.float32)
        for name in ("o", "dq", "dk", "dv", "dgk") if end > start else ():
            assert max_rel_error(packed[name][:, start:end], alone[name]) <= FLOAT_KERNEL_RTOL[torch.float32]
        for name in ("ht", "dh0"):
            assert max_rel_error(packed[name][i:i + 1], alone[name]) <= FLOAT_KERNEL_RTOL[torch.float32]


def _unrolled(q, k, v, gk, h0, scale):
    """Closed form of one head's outputs, ``[T, K]``/``[T, V]`` in float64: every pair ``(t, s)`` with its gate sum
    over ``(s, t]``, plus the initial state decayed over ``[0, t]``."""
    prefix = torch.cumsum(gk, 0)
    pair = prefix[:, None, :] - prefix[None, :, :]  # (t, s): sum over (s, t]; float64 keeps the difference exact
    causal = torch.ones(len(q), len(q), dtype=torch.bool).tril()
    weights = torch.where(causal[:, :, None], torch.exp(pair.masked_fill(~causal[:, :, None], 0)), 0)
    scores = torch.einsum("td,sd,tsd->ts", q * scale, k, weights)
    return scores @ v + (q * scale * torch.exp(prefix)) @ h0


@pytest.mark.parametrize(("T", "K", "V"), [(1, 4, 3), (9, 8, 5), (40, 16, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("gate", ["zero", "slow", "strong"])
def test_recurrence_matches_the_unrolled_closed_form(T, K, V, gate):
    inputs = gla_inputs(1, T, 2, K, V, "slow" if gate == "zero" else gate, seed=T * K + V)
    gk = torch.zeros_like(inputs["gk"]) if gate == "zero" else inputs["gk"]
    scale = 0.3
    o, ht = gla_recurrence_reference(inputs["q"], inputs["k"], inputs["v"], gk, scale, inputs["h0"], True)
    for h in range(2):
        q, k, v, g = (x[0, :, h] for x in (inputs["q"], inputs["k"], inputs["v"], gk))
        expected = _unrolled(q, k, v, g, inputs["h0"][0, h], scale)
        assert max_rel_error(o[0, :, h], expected) <= FLOAT_KERNEL_RTOL[torch.float64]
        to_end = torch.exp(g.sum(0) - torch.cumsum(g, 0))  # decay from each token to the end
        state = torch.exp(g.sum(0))[:, None] * inputs["h0"][0, h] + (k * to_end).T @ v
        assert max_rel_error(ht[0, h], state) <= FLOAT_KERNEL_RTOL[torch.float64]


def test_batch_rows_are_independent_sequences():
    inputs = gla_inputs(3, 12, 2, 8, 4, "strong", seed=1)
    o, ht = gla_recurrence_reference(inputs["q"], inputs["k"], inputs["v"], inputs["gk"], None, inputs["h0"], True)
    for b in range(3):
        row = [inputs[name][b:b + 1] for name in ("q", "k", "v", "gk")]
        o_b, ht_b = gla_recurrence_reference(*row, None, inputs["h0"][b:b + 1], True)
        assert torch.equal(o[b:b + 1], o_b) and torch.equal(ht[b:b + 1], ht_b)


@pytest.mark.parametrize("lengths", [[5, 0, 12], [1], [7, 7, 1, 3]], ids=str)
def test_packed_sequences_equal_separate_calls(lengths):
    cu_seqlens = packed_offsets(lengths)
    inputs = gla_inputs(1, sum(lengths), 2, 8, 6, "slow", seed=len(lengths), sequences=len(lengths))
    args = [inputs[name] for name in ("q", "k", "v", "gk")]
    o, ht = gla_recurrence_reference(*args, None, inputs["h0"], True, cu_seqlens)
    for i, (start, end) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])):
        o_i, ht_i = gla_recurrence_reference(*(x[:, start:end] for x in args), None, inputs["h0"][i:i + 1], True)
        assert torch.equal(o[:, start:end], o_i) and torch.equal(ht[i:i + 1], ht_i)


@pytest.mark.parametrize("split", [0, 1, 17, 30])
def test_a_split_continues_from_the_final_state(split):
    inputs = gla_inputs(2, 30, 2, 8, 4, "strong", seed=split)
    args = [inputs[name] for name in ("q", "k", "v", "gk")]
    o, ht = gla_recurrence_reference(*args, None, inputs["h0"], True)
    o1, h1 = gla_recurrence_reference(*(x[:, :split] for x in args), None, inputs["h0"], True)
    o2, h2 = gla_recurrence_reference(*(x[:, split:] for x in args), None, h1, True)
    assert max_rel_error(torch.cat([o1, o2], 1), o) <= FLOAT_KERNEL_RTOL[torch.float64]
    assert max_rel_error(h2, ht) <= FLOAT_KERNEL_RTOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_return_their_dtype_and_a_float32_state(dtype):
    inputs = gla_inputs(1, 5, 1, 4, 4, "slow", seed=2)
    args = [inputs[name].to(dtype) for name in ("q", "k", "v", "gk")]
    o, ht = gla_recurrence_reference(*args, None, None, True)
    expected, _ = gla_recurrence_reference(*(x.double() for x in args), None, None, True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close_kernel(o, expected, dtype)


def _call(op, overrides: dict, batch: int = 2):
    """``op`` on valid small inputs with some arguments replaced."""
    args = {"q": torch.zeros(batch, 10, 3, 4), "k": torch.zeros(batch, 10, 3, 4), "v": torch.zeros(batch, 10, 3, 5),
            "gk": torch.zeros(batch, 10, 3, 4)}
    args.update(overrides)
    return op(**args)


BAD_ARGUMENTS = [  # (id, replaced arguments, batch, exception, message pattern)
    ("q-3d", {"q": torch.zeros(10, 3, 4)}, 2, ValueError, r"q must be 4-D \[batch, seq, heads, key_dim\], got shape"),
    ("q-int", {"q": torch.zeros(2, 10, 3, 4, dtype=torch.int32)}, 2, TypeError,
     "q must be a floating-point tensor, got torch.int32"),
    ("v-list", {"v": [[0.0]]}, 2, TypeError, "v must be a torch.Tensor"),
    ("k-shape", {"k": torch.zeros(2, 10, 3, 8)}, 2, ValueError,
     r"k must have q's shape \[batch, seq, heads, key_dim\] = \[2, 10, 3, 4\], got \[2, 10, 3, 8\]"),
    ("v-seq", {"v": torch.zeros(2, 9, 3, 5)}, 2, ValueError, r"v must be .* with q's first three sizes \[2, 10, 3\]"),
    ("gk-per-head", {"gk": torch.zeros(2, 10, 3, 1)}, 2, ValueError,
     r"gk \(the log forget gate, one per key channel\) must have k's shape \[2, 10, 3, 4\], got \[2, 10, 3, 1\]"),
    ("dtype-mix", {"v": torch.zeros(2, 10, 3, 5, dtype=torch.float64)}, 2, TypeError,
     "q, k and v must share one dtype, got torch.float32, torch.float32 and torch.float64"),
    ("cu-batch", {"cu_seqlens": torch.tensor([0, 10])}, 2, ValueError,
     "cu_seqlens needs batch == 1 .*, got batch=2"),
    ("cu-float", {"cu_seqlens": torch.tensor([0.0, 10.0])}, 1, TypeError,
     "cu_seqlens must be an int64 tensor .*, got torch.float32"),
    ("cu-total", {"cu_seqlens": torch.tensor([0, 4, 9])}, 1, ValueError,
     r"cu_seqlens must rise from 0 to seq=10 without decreasing, got \[0, 4, 9\]"),
    ("cu-order", {"cu_seqlens": torch.tensor([0, 6, 4, 10])}, 1, ValueError, "cu_seqlens must rise from 0"),
    ("state-shape", {"initial_state": torch.zeros(1, 3, 4, 5)}, 2, ValueError,
     r"initial_state must have shape .* = \[2, 3, 4, 5\], got \[1, 3, 4, 5\]"),
    ("state-per-sequence", {"initial_state": torch.zeros(1, 3, 4, 5), "cu_seqlens": torch.tensor([0, 3, 10])}, 1,
     ValueError, r"= \[2, 3, 4, 5\], got \[1, 3, 4, 5\]"),
    ("scale-str", {"scale": "0.5"}, 2, TypeError, "scale must be a Python number or None"),
    ("backend", {"backend": "cuda"}, 2, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("op", [chunk_gla, fused_recurrent_gla], ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize(("overrides", "batch", "error", "match"), [case[1:] for case in BAD_ARGUMENTS],
                         ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_arguments_name_the_constraint_and_the_fix(op, overrides, batch, error, match):
    with pytest.raises(error, match=match):
        _call(op, overrides, batch)


def test_default_scale_is_key_dim_to_the_minus_half():
    inputs = gla_inputs(1, 6, 1, 16, 4, "slow", seed=3)
    args = [inputs[name] for name in ("q", "k", "v", "gk")]
    default, _ = chunk_gla(*args, backend="reference")
    explicit, _ = chunk_gla(*args, scale=0.25, backend="reference")
    assert torch.equal(default, explicit)
