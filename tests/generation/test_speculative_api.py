"""The user-facing contract: routing, errors with their fixes, cache rollback, metrics."""

import pytest
import torch
import transformers
from transformers import DynamicCache

import hf_plugins
from hf_plugins import SpeculativeConfig
from hf_plugins.generation import is_speculative_enabled
from hf_plugins.generation.cache_ops import crop_to
from hf_plugins.evaluation import load_speculative_metric, speculative_fields, summarize_speculative
from tests.quantizers.tiny_models import VOCAB_SIZE, tiny_model


@pytest.fixture
def pair():
    target = tiny_model("llama")[0].double()
    return target, hf_plugins.self_draft(target, bits=None, layers=1)


def _ids(batch=1, length=6, seed=0):
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_calls_without_a_draft_are_plain_generate(pair):
    target, _ = pair
    hf_plugins.disable_speculative(target)
    plain = target.generate(_ids(), max_new_tokens=8, do_sample=False)
    hf_plugins.enable_speculative(target)
    assert torch.equal(target.generate(_ids(), max_new_tokens=8, do_sample=False), plain)
    hf_plugins.disable_speculative(target)
    assert not is_speculative_enabled(target) and "generate" not in target.__dict__


def test_stats_are_returned_with_return_dict_and_add_up(pair):
    target, draft = pair
    out = target.generate(_ids(batch=3), assistant_model=draft, max_new_tokens=20, do_sample=False,
                          return_dict_in_generate=True, speculative_config=SpeculativeConfig(num_draft_tokens=3))
    stats = out.speculative_stats
    assert set(stats["draft_lengths"]) <= {3, 2, 1, 0}  # 3, shortened only near max_new_tokens
    assert stats["accepted"] <= stats["drafted"]
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    assert stats["row_forwards"] <= 3 * stats["target_forwards"]  # rows that finish leave the batch
    assert stats["tokens_per_target_forward"] == pytest.approx(stats["emitted"] / stats["row_forwards"])
    assert stats["emitted"] >= 3 * 19  # every row got its 19 tokens after the prefill's first one
    assert 0 < stats["draft_seconds"] < stats["total_seconds"]


def test_the_returned_cache_was_rolled_back_to_the_kept_tokens(pair):
    target, draft = pair
    out = target.generate(_ids(), assistant_model=draft, max_new_tokens=17, do_sample=False,
                          return_dict_in_generate=True, speculative_config=SpeculativeConfig(num_draft_tokens=5))
    assert out.speculative_stats["accepted"] < out.speculative_stats["drafted"]  # rejections happened
    # Batch 1 never has holes: the cache holds every token but the last, which no forward has seen yet.
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1


def test_crop_to_keeps_a_prefix_of_every_layer():
    cache = DynamicCache()
    keys = torch.randn(1, 2, 9, 4)
    cache.update(keys, keys + 1, 0)
    cache.update(keys * 2, keys - 1, 1)
    crop_to(cache, 5)
    assert cache.get_seq_length() == 5
    assert torch.equal(cache.layers[1].keys, keys[:, :, :5] * 2)
    crop_to(cache, 7)  # longer than what is there: nothing to do
    assert cache.get_seq_length() == 5


def test_a_cache_that_cannot_be_cropped_is_refused(pair):
    target, draft = pair
    cache = DynamicCache(config=target.config)
    for layer in cache.layers:
        layer.is_croppable = False
    with pytest.raises(ValueError, match="cannot be cropped. Use a croppable cache"):
        target.generate(_ids(), assistant_model=draft, max_new_tokens=5, cache=cache)


def test_a_draft_with_another_tokenizer_is_refused_with_the_fix():
    target = tiny_model("llama")[0]
    config = tiny_model("qwen2")[0].config
    config.vocab_size = 32000
    other = transformers.AutoModelForCausalLM.from_config(config)
    hf_plugins.enable_speculative(target)
    with pytest.raises(ValueError, match="does not share the target's tokenizer .*vocab_size 32000.*assistant_tokenizer="):
        target.generate(_ids(), assistant_model=other, max_new_tokens=5)
    eos_config = tiny_model("llama")[0].config
    eos_config.eos_token_id = 7
    other = transformers.AutoModelForCausalLM.from_config(eos_config)
    other.generation_config.eos_token_id = 7
    with pytest.raises(ValueError, match="eos_token_id 7 vs the target's 2"):
        target.generate(_ids(), assistant_model=other, max_new_tokens=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_beams=2), ValueError, "one sequence per row; got num_beams=2"),
        (dict(speculative_config="fast"), TypeError, "speculative_config must be a hf_plugins.SpeculativeConfig"),
    ],
)
def test_unsupported_requests_raise_with_the_constraint(pair, kwargs, error, message):
    target, draft = pair
    with pytest.raises(error, match=message):
        target.generate(_ids(), assistant_model=draft, max_new_tokens=5, **kwargs)


def test_speculative_config_without_a_draft_is_an_error(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="speculative_config applies only together with assistant_model"):
        target.generate(_ids(), max_new_tokens=5, speculative_config=SpeculativeConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_draft_tokens=0), "num_draft_tokens must be 'auto' or an int >= 1, got 0"),
        (dict(max_draft_tokens=0), "max_draft_tokens must be an int >= 1, got 0"),
        (dict(layer_parallel_group_size=1.5), "layer_parallel_group_size must be an int >= 1, got 1.5"),
        (dict(draft_context=0), r"draft_context must be None \(the whole prompt\) or an int >= 1, got 0"),
    ],
)
def test_config_validates_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_transformers_only_features_go_to_transformers_assisted_generation(pair):
    target, draft = pair
    hf_plugins.enable_speculative(target)
    out = target.generate(_ids(), assistant_model=draft, max_new_tokens=6, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    assert len(out.scores) == 6 and not hasattr(out, "speculative_stats")


def test_speculative_metrics_aggregate_runs_like_an_evaluate_metric(pair):
    target, draft = pair
    metric = load_speculative_metric()
    runs = []
    for seed in range(3):
        out = target.generate(_ids(batch=seed + 1, seed=seed), assistant_model=draft, max_new_tokens=10,
                              do_sample=False, return_dict_in_generate=True)
        runs.append(out.speculative_stats)
        metric.add(**speculative_fields(out.speculative_stats))
    result = metric.compute()
    accepted, drafted = sum(r["accepted"] for r in runs), sum(r["drafted"] for r in runs)
    assert result["acceptance_rate"] == pytest.approx(accepted / drafted)
    row_forwards = sum(r["row_forwards"] for r in runs)
    assert result["tokens_per_target_forward"] == pytest.approx(sum(r["emitted"] for r in runs) / row_forwards)
    assert result["runs"] == 3
    with pytest.raises(ValueError, match="nothing to compute: add"):
        summarize_speculative([])
    with pytest.raises(ValueError, match="speculative stats lack"):
        speculative_fields({"drafted": 1})


def test_stop_strings_without_a_tokenizer_are_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="stop_strings needs tokenizer= too"):
        target.generate(_ids(), assistant_model=draft, max_new_tokens=5, stop_strings=["x"])
