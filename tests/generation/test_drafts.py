"""Draft construction and draft-side machinery: self-drafts, EasySpec layer-parallel steps, draft length policy."""

import pytest
import torch
from transformers import DynamicCache

import hf_plugins
from hf_plugins import AwqLinear
from hf_plugins.generation.cache_ops import positions_from_mask
from hf_plugins.generation.draft_length import DraftLengthPolicy, best_draft_length
from hf_plugins.generation.layer_parallel import LayerParallelDraft
from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_config, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error


def _deeper(arch: str, layers: int, seed: int = 0):
    import transformers

    config = tiny_config(arch)
    config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"  # eager attention takes its softmax in fp32 even for fp64 models
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_self_draft_shares_embeddings_quantizes_linears_and_leaves_the_target_untouched():
    target = _deeper("llama", 4)
    ids = torch.randint(3, VOCAB_SIZE, (2, 11), generator=torch.Generator().manual_seed(0))
    before = target(ids).logits
    draft = hf_plugins.self_draft(target, bits=4, group_size=32, layers=3)
    assert torch.equal(target(ids).logits, before)
    assert draft.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert len(draft.model.layers) == 3 and draft.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1, 2]
    assert isinstance(draft.model.layers[0].self_attn.q_proj, AwqLinear)
    assert isinstance(draft.lm_head, AwqLinear)
    assert all(type(m) is torch.nn.Linear for m in target.modules() if isinstance(m, torch.nn.Linear))
    # Layers 0, 2 (rounded from 1.5) and 3 are kept: evenly spaced, first and last included.
    assert torch.equal(draft.model.layers[2].mlp.down_proj.scales, AwqLinear.from_linear(
        target.model.layers[3].mlp.down_proj, 4, 32).scales)


def test_layer_skip_self_draft_shares_the_kept_layers_weights():
    target = _deeper("qwen2", 4)
    draft = hf_plugins.self_draft(target, bits=None, layers=[0, 3])
    assert draft.model.layers[1].mlp.up_proj.weight is target.model.layers[3].mlp.up_proj.weight
    assert draft.model.layers[1] is not target.model.layers[3]
    ids = torch.randint(3, VOCAB_SIZE, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(draft(ids).logits).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=None), "would be the target itself"),
        (dict(bits=9), "bits must be an int in 2..8"),
        (dict(layers=0), r"layers must be in 1\.\.2"),
        (dict(layers=[0, 5]), r"layer indices must be distinct values in 0\.\.1"),
    ],
)
def test_self_draft_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_plugins.self_draft(tiny_model("llama")[0], **kwargs)


def _single_token_logits(model, fuzzy, ids, install_hooks=lambda: []):
    """Prefill ``ids[:, :-1]`` exactly, then the last token through ``fuzzy.step`` (or the model, under hooks)."""
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    positions = positions_from_mask(mask)
    model(ids[:, :-1], cache=cache, use_cache=True)
    if fuzzy is None:
        handles = install_hooks()
        try:
            return model(ids[:, -1:], position_ids=positions[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
    return fuzzy.step(ids[:, -1:], positions[:, -1:], mask, cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_layer_parallel_step_with_groups_of_one_is_the_model(arch):
    model = _deeper(arch, 3)
    ids = torch.randint(3, VOCAB_SIZE, (3, 9), generator=torch.Generator().manual_seed(2))
    exact = _single_token_logits(model, None, ids)
    fuzzy = _single_token_logits(model, LayerParallelDraft(model, 1), ids)
    assert max_rel_error(fuzzy, exact) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_layer_parallel_groups_change_the_draft_and_match_the_group_reference():
    model = _deeper("llama", 4).double()
    ids = torch.randint(3, VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(3))
    exact = _single_token_logits(model, None, ids)
    grouped = _single_token_logits(model, LayerParallelDraft(model, 2), ids)
    assert max_rel_error(grouped, exact) > 1e-3  # fuzzy drafting really drops the intra-group dependency

    # Reference: each group's attention sublayers read the group's input hidden state (EasySpec's fuzzy step).
    def attention_reads_group_input(layers_in_group):
        captured = {}

        def remember(module, args, kwargs):
            captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

        def replace(module, args):
            return (captured["hidden"],)

        handles = [layers_in_group[0].register_forward_pre_hook(remember, with_kwargs=True)]
        handles += [layer.input_layernorm.register_forward_pre_hook(replace) for layer in layers_in_group[1:]]
        return handles

    def install():
        return [h for start in (0, 2) for h in attention_reads_group_input(list(model.model.layers[start : start + 2]))]

    reference = _single_token_logits(model, None, ids, install)
    assert max_rel_error(grouped, reference) <= FLOAT_KERNEL_RTOL[torch.float64]


def _tiny_qwen3(layers: int):
    import transformers

    config = transformers.Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, head_dim=16,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_spread_groups_compute_what_fused_groups_compute(arch):
    # The multi-device schedule (one attention per layer on its own device) run on one device, against the fused
    # one; 5 layers in groups of 2 leave a last group of 1.
    model = (_tiny_qwen3(5) if arch == "qwen3" else _deeper(arch, 5)).double()
    ids = torch.randint(3, VOCAB_SIZE, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    fused = LayerParallelDraft(model, 2)
    spread = LayerParallelDraft(model, 2, fuse=False)
    assert all(stacked is None for stacked in spread._stacked) and all(s is not None for s in fused._stacked)
    logits = []
    for drafter in (fused, spread):
        cache = DynamicCache(config=model.config)
        positions = positions_from_mask(mask)
        model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache, use_cache=True)
        logits.append(drafter.step(ids[:, -1:], positions[:, -1:], mask, cache))
    assert max_rel_error(logits[1], logits[0]) <= FLOAT_KERNEL_RTOL[torch.float64]


def test_layer_parallel_fusing_needs_each_group_on_one_device():
    model = _deeper("llama", 4)
    model.model.layers[1].to("meta")  # the first group spans cpu and meta
    with pytest.raises(ValueError, match=r"fuse=True needs each group's layers on one device; a group spans "
                                         r"\['cpu', 'meta'\]"):
        LayerParallelDraft(model, 2, fuse=True)
    drafter = LayerParallelDraft(model, 2)
    assert drafter._stacked[0] is None and drafter._stacked[1] is not None
    assert drafter.devices[0] == [torch.device("cpu"), torch.device("meta")]


def test_layer_parallel_drafting_rejects_unsupported_families():
    with pytest.raises(ValueError, match="Layer-parallel drafting supports model types"):
        LayerParallelDraft(tiny_model("phi3")[0], 2)


def test_best_draft_length_grows_with_acceptance_and_shrinks_with_costs():
    # (acceptance, plain, v0, v1, d): 1 s steps, draft tokens of 0.1 s.
    assert best_draft_length(0.3, 1.0, 1.0, 0.0, 0.1, 12) < best_draft_length(0.9, 1.0, 1.0, 0.0, 0.1, 12)
    assert best_draft_length(0.8, 1.0, 1.0, 0.0, 0.5, 12) < best_draft_length(0.8, 1.0, 1.0, 0.0, 0.05, 12)
    assert best_draft_length(0.8, 1.0, 1.0, 0.4, 0.05, 12) < best_draft_length(0.8, 1.0, 1.0, 0.0, 0.05, 12)
    assert best_draft_length(0.999, 1.0, 1.0, 0.0, 0.0, 12) == 12
    # When every extra verified position costs nearly a whole step, plain decoding wins ...
    assert best_draft_length(0.5, 1.0, 1.0, 0.9, 0.2, 12) == 0
    # ... but only by the margin asked for, and a cheaper plain step tips the balance sooner.
    assert best_draft_length(0.5, 1.0, 1.0, 0.9, 0.2, 12, plain_margin=10.0) == 1
    assert best_draft_length(0.6, 1.0, 1.0, 0.0, 0.2, 12) > 0
    assert best_draft_length(0.6, 0.5, 1.0, 0.0, 0.2, 12) == 0


def test_adaptive_policy_follows_observed_acceptance_and_fixed_policy_stays():
    policy = DraftLengthPolicy(initial=4, maximum=12)
    for step in range(10):
        policy.update(torch.tensor([8, 8]), drafted=8, draft_seconds=0.08, verify_seconds=1.0)
        if step == DraftLengthPolicy.PROBE_PLAIN_AFTER:  # one plain step measures the plain cost
            assert policy.current == 0
            policy.update(torch.tensor([0, 0]), drafted=0, draft_seconds=0.0, verify_seconds=0.9)
    assert policy.acceptance_rate == 1.0 and policy.current >= 8
    for _ in range(25):
        policy.update(torch.tensor([0, 0]), drafted=8, draft_seconds=0.08, verify_seconds=1.0)
    assert policy.acceptance_rate < 0.2 and policy.current <= 2
    fixed = DraftLengthPolicy(fixed=3)
    fixed.update(torch.tensor([0]), drafted=3, draft_seconds=1.0, verify_seconds=1.0)
    assert fixed.current == 3


def test_step_costs_are_fitted_and_plain_steps_explore_again():
    policy = DraftLengthPolicy(initial=4, maximum=12, explore_every=3)
    policy.update(torch.tensor([0]), drafted=4, draft_seconds=9.0, verify_seconds=3.0)  # the draft's prefill
    assert policy.current == 4
    for k in (2, 6):
        policy.update(torch.tensor([0]), drafted=k, draft_seconds=0.05 * k, verify_seconds=1.0 + 0.5 * k)
    assert policy.current == 0  # one plain step measures the plain cost
    policy.update(torch.tensor([0]), drafted=0, draft_seconds=0.0, verify_seconds=0.8)
    for k in (2, 6):
        policy.update(torch.tensor([0]), drafted=k, draft_seconds=0.05 * k, verify_seconds=1.0 + 0.5 * k)
    assert policy.step_cost() == pytest.approx((0.8, 1.0, 0.5, 0.05))  # (plain, v0, v1, d)
    assert policy.current == 0  # nothing accepted and costly verification: plain steps
    policy.update(torch.tensor([0]), drafted=0, draft_seconds=0.0, verify_seconds=0.8)
    policy.update(torch.tensor([0]), drafted=0, draft_seconds=0.0, verify_seconds=0.8)
    assert policy.current == 0
    policy.update(torch.tensor([0]), drafted=0, draft_seconds=0.0, verify_seconds=0.8)
    assert policy.current == 1  # the third plain step in a row tries drafting again


def test_draft_context_limits_what_the_draft_reads_and_keeps_its_cache_aligned():
    from hf_plugins.generation.drafting import DraftModelCandidates

    draft = _deeper("llama", 2)
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(5))
    windowed = DraftModelCandidates(draft, VOCAB_SIZE, draft_context=5)
    windowed.num_tokens = 3
    candidates, _ = windowed.get_candidates(ids)
    assert windowed.cache.get_seq_length() == 5 + 2  # the window, then the first two drafts fed back
    # The first draft is what the model predicts from the last 5 prompt tokens alone (at their true positions).
    alone = draft(ids[:, -5:], position_ids=torch.arange(7, 12).expand(2, 5)).logits[:, -1].argmax(-1)
    assert torch.equal(candidates[:, 12], alone)
    # After verification accepted one draft per row, the cache keeps only window slots seen exactly.
    grown = torch.cat([candidates[:, :13], ids[:, :1]], dim=1)
    windowed.update_candidate_strategy(grown, None, torch.ones(2, dtype=torch.long))
    windowed.get_candidates(grown)
    assert windowed.cache.get_seq_length() == grown.shape[1] - 7 + 2
