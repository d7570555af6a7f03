"""Pipeline stages and schedules: losses and gradients equal one process; balanced splits; clear errors."""

import itertools

import pytest
import torch
import transformers

from hf_plugins.parallel.pipeline import balanced_ranges, build_pipeline, next_token_loss, stage_ranges
from tests.parallel.ranks import run_ranks
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

MICROBATCHES = 4


def _model(arch: str = "llama", layers: int = 4, vocab: int = 256) -> transformers.PreTrainedModel:
    configs = {
        "llama": transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False),
        "gemma2": transformers.Gemma2Config(num_key_value_heads=2, head_dim=16),
    }
    config = configs[arch]
    for key, value in dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4).items():
        setattr(config, key, value)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * layers if arch != "gemma2" else \
            ["sliding_attention", "full_attention"] * (layers // 2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def _pipeline_vs_one_process(rank, world_size, arch, schedule):
    model = _model(arch)
    reference = _model(arch)
    ids = torch.randint(3, 256, (8, 13), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    expected = [next_token_loss(reference(x).logits, y) for x, y in zip(inputs.chunk(MICROBATCHES),
                                                                       targets.chunk(MICROBATCHES))]
    torch.stack(expected).mean().backward()
    expected_grads = {name: param.grad for name, param in reference.named_parameters()}

    pipeline = build_pipeline(model, schedule=schedule, microbatches=MICROBATCHES)
    losses = pipeline.step(inputs, targets)
    names = {id(param): name for name, param in model.named_parameters()}
    grad_errors = {names[id(p)]: max_rel_error(p.grad, expected_grads[names[id(p)]]) for p in pipeline.parameters()}
    loss_error = max_rel_error(torch.stack(losses), torch.stack(expected).detach()) if losses else None
    return loss_error, grad_errors, pipeline.stage_indices, pipeline.busy_seconds <= pipeline.step_seconds


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_pipeline_losses_and_gradients_equal_one_process(arch, schedule):
    results = run_ranks(_pipeline_vs_one_process, arch, schedule)
    (first_loss, first_grads, first_stages, _), (last_loss, last_grads, last_stages, timed) = results
    assert first_loss is None  # losses live on the rank holding the last stage
    assert last_loss <= FLOAT_KERNEL_RTOL[torch.float32]
    expected_stages = ([0, 2], [1, 3]) if schedule == "interleaved-1f1b" else ([0], [1])
    assert (first_stages, last_stages) == expected_stages
    every_param = set(first_grads) | set(last_grads)
    assert every_param >= {name for name, _ in _model(arch).named_parameters()}
    for name, error in {**first_grads, **last_grads}.items():
        assert error <= FLOAT_KERNEL_RTOL[torch.float32], name
    assert timed


def test_balanced_ranges_minimise_the_largest_stage():
    gen = torch.Generator().manual_seed(0)
    for n, parts in [(7, 3), (9, 4), (5, 5)]:
        costs = torch.rand(n, generator=gen).tolist()
        ranges = balanced_ranges(costs, parts, first_extra=0.5, last_extra=0.8)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))

        def worst(cuts):
            bounds = [0, *cuts, n]
            totals = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
            totals[0] += 0.5
            totals[-1] += 0.8
            return max(totals)

        best = min(worst(c) for c in itertools.combinations(range(1, n), parts - 1))
        assert worst([b for _, b in ranges[:-1]]) == pytest.approx(best)


def test_stage_balance_by_params_or_flops_moves_layers_off_the_head_stage():
    # Untied 1024 x 64 embedding and head: equal in memory, but only the head computes (~1.8 layers of FLOPs per
    # token), which long sequences' attention outweighs.
    model = _model("qwen2", layers=8, vocab=1024)
    assert stage_ranges(model, 2, "params") == [(0, 4), (4, 8)]
    assert stage_ranges(model, 2, "flops", seq_len=1) == [(0, 5), (5, 8)]
    assert stage_ranges(model, 2, "flops", seq_len=4096) == [(0, 4), (4, 8)]


def test_pipeline_errors_name_the_constraint():
    with pytest.raises(ValueError, match="Cannot split 4 layers into 5 pipeline stages: use 1 to 4 stages"):
        balanced_ranges([1.0] * 4, 5)
    with pytest.raises(ValueError, match="balance must be one of"):
        stage_ranges(_model(), 2, "bytes")
