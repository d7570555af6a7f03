"""AWQ transform on tiny random models of every architecture: graph-found groups, exact folding, AWQ beats RTN."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_plugins
from hf_plugins.quantizers.awq import algorithm
from hf_plugins.quantizers.awq.algorithm import ClipChanges, apply_awq
from hf_plugins.quantizers.awq.calibration import (
    ModuleInputs,
    capture_block_activations,
    capture_block_inputs,
    find_decoder_blocks,
    propagate,
)
from hf_plugins.quantizers.awq.int_quant import fake_quantize
from hf_plugins.quantizers.awq.scaling_groups import discover_block_layout, fold_scales
from hf_plugins.quantizers.awq.search import (
    ClipBounds,
    GramError,
    ReplayError,
    WeightQuantizer,
    apply_clip,
    candidate_scales,
    clamp_rows,
    diagonal_blocks,
    leading_tokens,
    scaled_gram,
    search_best_clip,
    search_best_scales,
    weight_magnitude,
)
from tests.quantizers.tiny_models import TINY_ARCHS, random_token_ids, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

N_SAMPLES, SEQ_LEN = 16, 64

_QKV = {
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
}
_MLP = {
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
}
_VALUE_TO_OUTPUT = {("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj")}
_GEMMA_ATTENTION = {
    ("input_layernorm", "offset_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
}
_GEMMA_UP_DOWN = {("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj")}
# Under GQA / MQA (llama, qwen2, gemma, gemma2) o_proj's input channels are tied per kv head: still v -> o.

# (producer, fold kind, linears, inspected module) per block, written by hand: the code must find them unaided.
EXPECTED_GROUPS = {
    "llama": _QKV | _VALUE_TO_OUTPUT | _MLP,
    "qwen2": _QKV | _VALUE_TO_OUTPUT | _MLP,
    "mistral": _QKV | _VALUE_TO_OUTPUT | _MLP,
    "phi3": {
        ("input_layernorm", "norm", ("self_attn.qkv_proj",), "self_attn"),
        ("self_attn.qkv_proj[128:192]", "linear", ("self_attn.o_proj",), "self_attn.o_proj"),
        ("post_attention_layernorm", "norm", ("mlp.gate_up_proj",), "mlp"),
        ("mlp.gate_up_proj[128:256]", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    },
    "gemma": _GEMMA_ATTENTION
    | _VALUE_TO_OUTPUT
    | {("post_attention_layernorm", "offset_norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")}
    | _GEMMA_UP_DOWN,
    "gemma2": _GEMMA_ATTENTION
    | _VALUE_TO_OUTPUT
    | {("pre_feedforward_layernorm", "offset_norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")}
    | _GEMMA_UP_DOWN,
}

_SEPARATE_CLIP_ROWS = {
    "self_attn.v_proj": (None, None),
    "self_attn.o_proj": (None, None),
    "mlp.gate_proj": (None, None),
    "mlp.up_proj": (None, None),
    "mlp.down_proj": (None, None),
}
# linear -> clipped rows (start, stop); q and k feed attention scores and are never clipped.
EXPECTED_CLIP_ROWS = {
    "llama": _SEPARATE_CLIP_ROWS,
    "qwen2": _SEPARATE_CLIP_ROWS,
    "mistral": _SEPARATE_CLIP_ROWS,
    "gemma": _SEPARATE_CLIP_ROWS,
    "gemma2": _SEPARATE_CLIP_ROWS,
    "phi3": {
        "self_attn.qkv_proj": (128, 192),
        "self_attn.o_proj": (None, None),
        "mlp.gate_up_proj": (None, None),
        "mlp.down_proj": (None, None),
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _block_layouts(model: nn.Module, ids: torch.Tensor) -> list:
    """Each block with its layout, discovered on a one-sample probe propagated through the float blocks."""
    _, blocks = find_decoder_blocks(model)
    probe = capture_block_inputs(model, blocks[0], ids[:1], batch_size=1)
    layouts = []
    for block in blocks:
        layouts.append((block, discover_block_layout(block, probe[0])))
        probe = propagate(block, probe)
    return layouts


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rtn_quantize(model: nn.Module, bits: int, group_size: int) -> None:
    """What the quantizer does after AWQ: round-to-nearest every decoder-block linear."""
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        for module in blocks.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, bits, group_size))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scaling_groups_are_found_from_the_graph(arch):
    model, _ = tiny_model(arch)
    for _, layout in _block_layouts(model, random_token_ids(1, 32)):
        found = {(str(g.producer), g.producer.kind.value, g.linears, g.inspect) for g in layout.groups}
        assert found == EXPECTED_GROUPS[arch]
        clip_rows = {name: (rows.start, rows.stop) for name, rows in layout.clip_rows.items()}
        assert clip_rows == EXPECTED_CLIP_ROWS[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folding_random_scales_keeps_logits(arch):
    model, _ = tiny_model(arch)
    ids = random_token_ids(2, 32)
    expected = _logits(model, ids)
    generator = torch.Generator().manual_seed(1)
    for block, layout in _block_layouts(model, ids):
        for group in layout.groups:
            width = block.get_submodule(group.linears[0]).in_features
            fold_scales(block, group, torch.rand(width, generator=generator) * 4 + 0.25)
    assert max_rel_error(_logits(model, ids), expected) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_awq_without_clipping_keeps_logits(arch):
    model, _ = tiny_model(arch)
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    expected = _logits(model, ids)
    report = apply_awq(model, ids, bits=4, group_size=32, clip=False, progress=False)
    assert all(g.error_awq <= g.error_rtn for block in report.blocks for g in block.groups)
    # Checked on two samples, like the folding test: the max over many tokens only grows with fp32 rounding tails.
    assert max_rel_error(_logits(model, ids[:2]), expected[:2]) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 3], ids=["w4", "w3"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_awq_has_lower_logit_error_than_rtn(arch, bits):
    model, _ = tiny_model(arch)
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    expected = _logits(model, ids)
    rtn = copy.deepcopy(model)
    _rtn_quantize(rtn, bits, group_size=32)
    apply_awq(model, ids, bits=bits, group_size=32, progress=False)
    _rtn_quantize(model, bits, group_size=32)
    rtn_error = (_logits(rtn, ids) - expected).pow(2).mean()
    awq_error = (_logits(model, ids) - expected).pow(2).mean()
    assert awq_error < 0.9 * rtn_error


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gqa_output_projection_channels_are_tied_to_value_rows(arch):
    """o_proj input channel (head h, dim d) is a copy of v_proj row (kv head h // n_rep, dim d); the found map must
    say exactly that, and the searched scales must be equal across each tie so they fold into one v row."""
    model, _ = tiny_model(arch)
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    expected_map = tuple(
        (head // n_rep) * head_dim + dim for head in range(config.num_attention_heads) for dim in range(head_dim)
    )
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    for _, layout in _block_layouts(model, ids):
        (value_to_output,) = [group for group in layout.groups if group.linears == ("self_attn.o_proj",)]
        assert value_to_output.producer.channel_map == expected_map
        values = torch.arange(len(expected_map), dtype=torch.float32)
        tied = value_to_output.producer.tie(values)
        assert torch.equal(tied.reshape(config.num_attention_heads, head_dim)[::n_rep],
                           values.reshape(-1, n_rep, head_dim).mean(1))
        assert torch.equal(value_to_output.producer.channel_scales(tied), tied)


def test_gqa_searched_scales_are_tied_and_beat_rtn():
    model, _ = tiny_model("llama")
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    block, layout = _block_layouts(model, ids)[0]
    (group,) = [group for group in layout.groups if group.linears == ("self_attn.o_proj",)]
    o_proj = block.get_submodule("self_attn.o_proj")
    inputs = torch.randn(500, o_proj.in_features, generator=torch.Generator().manual_seed(0))
    inputs[:, 5] *= 20  # one salient channel: its tie partners must follow it
    result = search_best_scales(
        GramError(o_proj, inputs.T @ inputs, inputs.shape[0]), [o_proj], [True], inputs.abs().mean(0),
        WeightQuantizer(bits=4, group_size=32), n_grid=20, duo_scaling=True, tie=group.producer.tie,
    )
    assert result.best_alpha > 0 and result.error_awq < result.error_rtn
    assert torch.allclose(group.producer.tie(result.scales), result.scales, rtol=1e-6)

    report = apply_awq(model, ids, bits=4, group_size=32, clip=False, progress=False)
    o_proj_groups = [g for block in report.blocks for g in block.groups if g.linears == ("self_attn.o_proj",)]
    assert len(o_proj_groups) == 2
    assert all(g.error_awq < g.error_rtn for g in o_proj_groups)


def test_scale_search_keeps_plain_rtn_when_no_alpha_beats_it():
    linear = nn.Linear(64, 16)
    quantizer = WeightQuantizer(bits=4, group_size=32)
    rtn_weight = quantizer.fake(linear.weight.detach())

    def error_unless_plain_rtn() -> float:
        return 0.0 if torch.equal(linear.weight, rtn_weight) else 1.0

    magnitude = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5
    result = search_best_scales(error_unless_plain_rtn, [linear], [True], magnitude, quantizer, n_grid=20,
                                duo_scaling=True)
    assert result.best_alpha is None and result.error_awq == result.error_rtn == 0.0
    assert torch.equal(result.scales, torch.ones(64))


def test_partial_last_group_and_per_channel_run():
    model, _ = tiny_model("llama")
    ids = random_token_ids(4, SEQ_LEN)
    for group_size in (48, -1):
        report = apply_awq(copy.deepcopy(model), ids, bits=4, group_size=group_size, progress=False)
        assert len(report.blocks) == 2


def test_calibration_holds_one_block_of_inputs():
    model, _ = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    inputs_seen: list[list[weakref.ref]] = [[] for _ in blocks]
    alive_when_next_block_ran = []

    def watch(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index > 0:
                alive_when_next_block_ran.extend(ref for ref in inputs_seen[index - 1] if ref() is not None)
            inputs_seen[index].append(weakref.ref(args[0]))

        return hook

    handles = [block.register_forward_pre_hook(watch(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        report = apply_awq(model, random_token_ids(N_SAMPLES, SEQ_LEN), bits=4, group_size=32, batch_size=4,
                           progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert inputs_seen[0] and not alive_when_next_block_ran
    # Held per block: its inputs and outputs, the inputs of self_attn, mlp and down_proj, the eager attention masks
    # and the clip-search token samples; a fixed handful of block-input sizes that must not grow block by block.
    block_input_bytes = N_SAMPLES * SEQ_LEN * model.config.hidden_size * 4
    held = [block.held_bytes for block in report.blocks]
    assert held[0] == held[1] <= 10 * block_input_bytes


def test_modules_to_not_convert_stay_untouched():
    model, _ = tiny_model("llama")
    original = model.model.layers[0].mlp.down_proj.weight.clone()
    report = apply_awq(
        model, random_token_ids(4, SEQ_LEN), bits=4, group_size=32,
        modules_to_not_convert={"model.layers.0.mlp.down_proj"}, progress=False,
    )
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, original)
    assert "mlp.down_proj" in report.blocks[0].clip_skipped
    assert "mlp.down_proj" in report.blocks[1].clipped


def test_awq_is_deterministic_and_reports():
    model, _ = tiny_model("qwen2")
    ids = random_token_ids(4, SEQ_LEN)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    report = apply_awq(first, ids, bits=4, group_size=32, progress=False)
    apply_awq(second, ids, bits=4, group_size=32, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    text = str(report)
    assert "input_layernorm" in text and "mlp.up_proj" in text and "self_attn.o_proj" in text
    assert all(g.error_awq <= g.error_rtn for block in report.blocks for g in block.groups)


def test_clip_search_never_increases_the_partial_product_error():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 80, generator=generator)
    weight[:, 3] *= 6  # an outlier column makes clipping pay off
    inputs = torch.randn(300, 80, generator=generator)
    quantizer = WeightQuantizer(bits=3, group_size=32)  # 80 = 2 full groups + a partial one
    bounds = search_best_clip(weight, inputs.T @ inputs, quantizer, max_batch_elements=3 * 80 * 10).separate
    assert bounds.shape == (2, 40, 3)
    clipped = weight.clone()
    result = apply_clip(clipped, bounds, inputs.T @ inputs, quantizer)
    assert result.ranges_shrunk > 0 and result.rows_clipped > 0
    plain_error = (inputs @ (quantizer.fake(weight) - weight).T).pow(2).mean()
    clipped_error = (inputs @ (quantizer.fake(clipped) - weight).T).pow(2).mean()
    assert clipped_error < plain_error


def test_clip_is_kept_only_on_rows_whose_whole_output_error_drops():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 64, generator=generator)
    # Both groups see the same inputs, so their partial-product errors add up or cancel: per-group optimal clips
    # can make a row worse as a whole.
    shared = torch.randn(500, 32, generator=generator)
    inputs = torch.cat([shared, shared + 0.1 * torch.randn(500, 32, generator=generator)], dim=1)
    gram = inputs.T @ inputs
    quantizer = WeightQuantizer(bits=3, group_size=32)
    bounds = search_best_clip(weight, gram, quantizer).separate
    guarded = weight.clone()
    result = apply_clip(guarded, bounds, gram, quantizer)

    def row_error(candidate: torch.Tensor) -> torch.Tensor:
        return (inputs @ (quantizer.fake(candidate) - weight).T).pow(2).sum(0)

    unguarded_error = row_error(clamp_rows(weight, bounds, quantizer))
    plain_error = row_error(weight)
    guarded_error = row_error(guarded)
    refused = (unguarded_error >= plain_error) & (clamp_rows(weight, bounds, quantizer) != weight).any(dim=1)
    assert result.rows_refused == int(refused.sum()) > 0
    assert result.rows_clipped > 0
    assert torch.all(guarded_error <= plain_error * (1 + 1e-5))
    assert torch.equal(guarded[refused], weight[refused])


def _token_loop_clip(
    weight: torch.Tensor, inputs: torch.Tensor, quantizer: WeightQuantizer, stages: int = 3
) -> torch.Tensor:
    """The clip search written out as AutoAWQ's auto_clip does it: every candidate compares the group-partial
    products token by token. Stage 1 is AutoAWQ's symmetric shrink; stages 2 and 3 shrink the lower, then the upper
    bound alone. Returns the bounds ``[2, out, n_groups]`` after ``stages`` stages."""
    grouped_inputs = quantizer.grouped(inputs)
    grouped = quantizer.grouped(weight)
    reference = torch.einsum("tgk,ogk->ogt", grouped_inputs, grouped)

    def partial_product_error(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        clipped = torch.minimum(torch.maximum(grouped, lower[..., None]), upper[..., None])
        quantized = quantizer.fake(clipped.reshape(weight.shape[0], -1)).reshape(grouped.shape)
        return (torch.einsum("tgk,ogk->ogt", grouped_inputs, quantized) - reference).pow(2).mean(dim=-1)

    def best_of(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        best_lower, best_upper = candidates[0]
        best_error = torch.full_like(best_lower, float("inf"))
        for lower, upper in candidates:
            error = partial_product_error(lower, upper)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lower = torch.where(better, lower, best_lower)
            best_upper = torch.where(better, upper, best_upper)
        return best_lower, best_upper

    shrinks = [1 - step / 20 for step in range(10)]
    magnitude = grouped.abs().amax(dim=-1)
    lower, upper = best_of([(-magnitude * shrink, magnitude * shrink) for shrink in shrinks])
    lower, upper = torch.maximum(lower, grouped.amin(dim=-1)), torch.minimum(upper, grouped.amax(dim=-1))
    if stages >= 2:
        lower, upper = best_of([(lower * shrink, upper) for shrink in shrinks])
    if stages >= 3:
        lower, upper = best_of([(lower, upper * shrink) for shrink in shrinks])
    return torch.stack([lower, upper])


def test_clip_search_matches_the_token_loop():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 80, generator=generator)
    inputs = torch.randn(300, 80, generator=generator)
    inputs[:, 5] *= 10
    quantizer = WeightQuantizer(bits=4, group_size=32)
    bounds = search_best_clip(weight, inputs.T @ inputs, quantizer)
    assert torch.equal(bounds.symmetric, _token_loop_clip(weight, inputs, quantizer, stages=1))
    assert torch.equal(bounds.separate, _token_loop_clip(weight, inputs, quantizer))
    symmetric_only = search_best_clip(weight, inputs.T @ inputs, quantizer, separate_bounds=False)
    assert symmetric_only.separate is None and torch.equal(symmetric_only.symmetric, bounds.symmetric)


def test_separate_clip_bounds_never_lose_to_the_symmetric_clip():
    generator = torch.Generator().manual_seed(0)
    # Skewed groups: a symmetric clip ties the long positive tail's bound to the short negative side's.
    weight = torch.randn(60, 96, generator=generator).abs().pow(2) - 0.5
    inputs = torch.randn(400, 96, generator=generator)
    quantizer = WeightQuantizer(bits=3, group_size=32)
    symmetric, separate = search_best_clip(weight, inputs.T @ inputs, quantizer)
    assert torch.all(separate[0] >= symmetric[0]) and torch.all(separate[1] <= symmetric[1])
    assert torch.any(separate[0] > symmetric[0]) and torch.any(separate[1] < symmetric[1])

    def partial_product_errors(bounds: torch.Tensor) -> torch.Tensor:
        """``[out, n_groups]`` squared error of each group's partial products over the tokens."""
        difference = quantizer.grouped(quantizer.fake(clamp_rows(weight, bounds, quantizer)) - weight)
        return torch.einsum("tgk,ogk->ogt", quantizer.grouped(inputs), difference).pow(2).sum(dim=-1)

    error_separate, error_symmetric = partial_product_errors(separate), partial_product_errors(symmetric)
    assert torch.all(error_separate <= error_symmetric * (1 + 1e-5))
    assert error_separate.sum() < 0.99 * error_symmetric.sum()


def test_scaled_gram_equals_gram_of_scaled_inputs():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 80, generator=generator)
    scales = torch.rand(80, generator=generator) * 3 + 0.2
    expected = (inputs / scales).T @ (inputs / scales)
    assert torch.allclose(scaled_gram(inputs.T @ inputs, scales), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, -1], ids=["partial-last-group", "per-channel"])
def test_diagonal_blocks_are_the_groups_own_gram_matrices(group_size):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 80, generator=generator)
    quantizer = WeightQuantizer(bits=4, group_size=group_size)
    blocks = diagonal_blocks(inputs.T @ inputs, quantizer)
    width = quantizer.group_width(80)
    padded = torch.nn.functional.pad(inputs, (0, blocks.shape[0] * width - 80))
    for index, block in enumerate(blocks):
        columns = padded[:, index * width : (index + 1) * width]
        assert torch.allclose(block, columns.T @ columns, rtol=1e-5, atol=1e-4)
    assert blocks.shape == ((3, 32, 32) if group_size == 32 else (1, 80, 80))


@pytest.mark.parametrize("quantized_inputs", [True, False], ids=["quantized", "float"])
def test_next_block_is_calibrated_on_quantized_or_float_outputs(quantized_inputs):
    model, _ = tiny_model("llama")
    float_model = copy.deepcopy(model)
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    _, blocks = find_decoder_blocks(model)
    seen = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args[0].shape[0] == 4 and not seen:  # the first calibration mini-batch, not the 1-sample probe
            seen.append(args[0].clone())

    handle = blocks[1].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        apply_awq(model, ids, bits=3, group_size=32, batch_size=4, quantized_inputs=quantized_inputs,
                  progress=False)
    finally:
        handle.remove()
    first_call = capture_block_inputs(model, blocks[0], ids[:4], batch_size=4)[0]
    float_block = find_decoder_blocks(float_model)[1][0]
    _rtn_quantize(model, 3, group_size=32)
    with torch.inference_mode():
        float_output = first_call.run(float_block)
        expected = first_call.run(blocks[0]) if quantized_inputs else float_output
    assert max_rel_error(seen[0], expected) <= FLOAT_KERNEL_RTOL[torch.float32]
    assert (max_rel_error(seen[0], float_output) > 1e-3) == quantized_inputs


def test_gram_error_equals_replayed_linear_error():
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 24)
    inputs = torch.randn(3, 20, 96, generator=generator)
    inputs[..., 7] *= 20  # an activation outlier, where cancellation in the quadratic form would show
    replay = ReplayError(linear, [ModuleInputs((batch,), {}) for batch in inputs.split(2)])
    flat = inputs.reshape(-1, 96)
    gram = GramError(linear, flat.T @ flat, n_tokens=flat.shape[0])
    with torch.no_grad():
        linear.weight.copy_(WeightQuantizer(bits=3, group_size=32).fake(linear.weight))
    assert gram() == pytest.approx(replay(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits must be an integer in"),
        ({"group_size": 0}, "group_size must be a positive integer or -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"calibration_ids": torch.zeros(8)}, r"calibration_ids must be an integer tensor \[n_samples, seq_len\]"),
        ({"clip": 1}, r"clip must be True, False or 'auto', got 1\."),
    ],
    ids=["bits", "group_size", "batch_size", "ids_shape", "clip_int"],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    model, _ = tiny_model("llama")
    arguments = {"calibration_ids": random_token_ids(2, 8), "bits": 4, "group_size": 32, "progress": False}
    arguments.update(kwargs)
    ids = arguments.pop("calibration_ids")
    with pytest.raises(ValueError, match=message):
        apply_awq(model, ids, **arguments)


def test_clip_changes_undo_and_redo_exactly():
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    before = weight.flatten().clone()
    weight.view(-1)[[3, 17, 41]] = torch.tensor([0.5, -0.25, 0.125])
    clipped = weight.clone()
    changes = ClipChanges()
    changes.record(weight.view(-1), before)
    changes.undo()
    assert torch.equal(weight.flatten(), before)
    changes.redo()
    assert torch.equal(weight, clipped)


def _clipped_copy(model: nn.Module, ids: torch.Tensor, clip: bool, monkeypatch, bounds: str = "symmetric"):
    """``model`` transformed with ``clip`` and float block inputs, applying the given ``bounds`` of the search."""
    transformed = copy.deepcopy(model)
    search = algorithm.search_best_clip

    def chosen_bounds(*args, **kwargs) -> ClipBounds:
        return ClipBounds(getattr(search(*args, **{**kwargs, "separate_bounds": True}), bounds), None)

    with monkeypatch.context() as patch:
        patch.setattr(algorithm, "search_best_clip", chosen_bounds)
        apply_awq(transformed, ids, bits=4, group_size=32, clip=clip, quantized_inputs=False, progress=False)
    return transformed


@pytest.mark.parametrize("clips_win", [True, False], ids=["kept", "undone"])
def test_auto_clip_keeps_the_separate_bound_clips_only_when_the_validation_loss_drops(clips_win, monkeypatch):
    model, _ = tiny_model("llama")
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    # Float block inputs: the clips do not steer later blocks' searches, so "undone" must equal clip=False exactly.
    expected = _clipped_copy(model, ids, clips_win, monkeypatch, bounds="separate")
    symmetric = _clipped_copy(model, ids, True, monkeypatch)
    losses = iter([1.0, 2.0] if clips_win else [2.0, 1.0])
    monkeypatch.setattr(algorithm, "_quantized_nll", lambda *args: (next(losses), 5))
    report = apply_awq(
        model, ids, bits=4, group_size=32, clip="auto", validation_ids=random_token_ids(2, SEQ_LEN, seed=1),
        quantized_inputs=False, progress=False,
    )
    assert report.clip_validation.kept is clips_win
    assert ("clip kept" if clips_win else "clip undone") in str(report)
    for (name, actual), (_, wanted) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(actual, wanted), name
    differs = any(not torch.equal(model.state_dict()[name], tensor) for name, tensor in symmetric.state_dict().items())
    assert differs, "separate bounds must change some clip of the tiny model"


def test_auto_clip_without_validation_text_applies_the_symmetric_clips(monkeypatch):
    model, _ = tiny_model("qwen2")
    ids = random_token_ids(N_SAMPLES, SEQ_LEN)
    expected = _clipped_copy(model, ids, True, monkeypatch)
    report = apply_awq(model, ids, bits=4, group_size=32, clip="auto", quantized_inputs=False, progress=False)
    assert report.clip_validation is None
    for (name, actual), (_, wanted) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(actual, wanted), name


def test_validation_loss_is_the_quantized_models_next_token_loss():
    model, _ = tiny_model("qwen2")
    ids = random_token_ids(2, 24, seed=3)
    quantizer = WeightQuantizer(bits=3, group_size=32)
    reference = copy.deepcopy(model)
    linears = [module for module in find_decoder_blocks(model)[1].modules() if isinstance(module, nn.Linear)]
    nll, n_tokens = algorithm._quantized_nll(model, ids, linears, quantizer)
    with torch.no_grad():
        for module in find_decoder_blocks(reference)[1].modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(quantizer.fake(module.weight))
    logits = reference(ids).logits[:, :-1]
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    float_nll = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert n_tokens == 2 * 23
    assert abs(nll - expected) < 1e-5 * expected
    assert abs(float_nll - expected) > 1e-3 * expected, "3-bit weights must change the loss"


def test_quantize_holds_out_validation_text_for_auto_clip():
    from tests.contract.char_tokenizer import CALIBRATION_TEXTS, char_tokenizer

    model, _ = tiny_model("qwen2")
    config = hf_plugins.AwqConfig(bits=4, group_size=32, calibration_samples=3, calibration_seq_len=32)
    report = hf_plugins.quantize(model, config, calibration_data=CALIBRATION_TEXTS, tokenizer=char_tokenizer())
    assert report.n_samples == 3
    assert report.clip_validation.n_tokens == 4 * 31


@pytest.mark.parametrize("minimum", [0.0, 0.05, 0.3, 0.55, 0.7, 0.95])
def test_coarse_to_fine_scale_search_finds_the_exhaustive_alpha_with_fewer_evaluations(minimum):
    """An error unimodal along alpha (its minimum on an even or odd grid point, or at an end): the coarse-to-fine
    search picks the exhaustive search's alpha and scales with 10 module evaluations (RTN included), not n_grid + 1."""
    linear = nn.Linear(64, 16)
    quantizer = WeightQuantizer(bits=4, group_size=32)
    magnitude = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5
    original = linear.weight.detach().clone()
    weight_mean = weight_magnitude([original], quantizer)
    # The weights each grid step gives the linear, to tell which candidate an evaluation sees.
    trial_weights = []
    for step in range(20):
        scales = candidate_scales(magnitude, weight_mean, step / 20)
        trial_weights.append(quantizer.fake(original * scales) / scales)
    evaluations = []

    def error() -> float:
        evaluations.append(1)
        steps = [step for step, weight in enumerate(trial_weights) if torch.equal(linear.weight, weight)]
        return 1.0 + (steps[0] / 20 - minimum) ** 2 if steps else 10.0

    results, calls = {}, {}
    for exhaustive in (True, False):
        evaluations.clear()
        results[exhaustive] = search_best_scales(error, [linear], [True], magnitude, quantizer, n_grid=20,
                                                 duo_scaling=True, exhaustive=exhaustive)
        calls[exhaustive] = len(evaluations)
    assert results[False].best_alpha == results[True].best_alpha == pytest.approx(round(minimum * 20) / 20)
    assert torch.equal(results[False].scales, results[True].scales)
    assert calls[True] == 21 and calls[False] <= 10


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_replay_on_leading_samples_equals_the_full_replay_cut(arch):
    """The scale search replays the leading samples only: slicing the captured attention inputs (hidden states,
    masks, position embeddings) must give exactly the full call's first rows."""
    model, _ = tiny_model(arch)
    _, blocks = find_decoder_blocks(model)
    calls = capture_block_inputs(model, blocks[0], random_token_ids(6, SEQ_LEN), batch_size=3)
    inspected = "self_attn"
    activations = capture_block_activations(blocks[0], calls, replay_modules={inspected}, input_linears=(),
                                            gram_linears=())
    inputs = activations.replay_inputs[inspected]
    kept = leading_tokens(inputs, tokens=SEQ_LEN * 4)
    assert [i.hidden.shape[0] for i in kept] == [3, 1]
    module = blocks[0].get_submodule(inspected)
    with torch.no_grad():
        assert torch.equal(kept[1].run(module), inputs[1].run(module)[:1])
        assert torch.equal(kept[0].run(module), inputs[0].run(module))
    assert leading_tokens(inputs, tokens=1)[0].hidden.shape[0] == 1
    with torch.inference_mode():
        replay = ReplayError(module, inputs, tokens=SEQ_LEN * 4)
        assert [i.hidden.shape[0] for i in replay.replay_inputs] == [3, 1] and replay() == 0.0
