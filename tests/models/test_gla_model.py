"""The GLA model family: config validation, the layer's modes and padding, cached decoding, generate, crop for
speculative decoding, save/reload through the Auto classes, training gradients and our AWQ quantizer on it."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

import hf_plugins
from hf_plugins import GatedLinearAttention, GLACache, GLAConfig, GLAForCausalLM
from tests.models.lm_checks import greedy_by_recomputation, training_losses
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error, sqnr_db

VOCAB = 96
VARIANTS = {
    "gla": dict(),
    "gla-conv": dict(use_short_conv=True),
    "hybrid": dict(attn_layers=[1], attn_num_heads=4, attn_num_kv_heads=2),
}


def tiny_gla(variant: str = "gla", dtype=torch.float64, **overrides) -> GLAForCausalLM:
    """A 3-block GLA LM (hidden 64, 2 heads) with random weights, in eval mode; fp64 so modes compare tightly."""
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=2, intermediate_size=96,
                eos_token_id=None)
    config = GLAConfig(**{**base, **VARIANTS[variant], **overrides})
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # gates away from their init so the decay differs per channel and token
        for block in model.model.layers:
            if not block.is_softmax:
                block.attn.gk_proj[1].bias.normal_(2.0, 2.0)
    return model


def ids(batch: int, tokens: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_heads=3), r"hidden_size \* expand_k = 512 must split into num_heads = 3 heads"),
    (dict(attn_layers=[24]), r"attn_layers must be distinct block indices in \[0, 24\), got \[24\]"),
    (dict(attn_mode="fused"), r"attn_mode must be one of \('auto', 'chunk', 'recurrent'\), got 'fused'"),
    (dict(attn_layers=[0], attn_num_heads=6, attn_num_kv_heads=4), r"attn_num_heads \(6\), a multiple of"),
])
def test_config_rejects_inconsistent_values(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        GLAConfig(**kwargs)


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"value dimension hidden_size \* expand_v \(100\) must be a positive multiple "
                                         r"of num_heads \(3\)"):
        GatedLinearAttention(100, num_heads=3, expand_k=0.48)
    with pytest.raises(ValueError, match="mode must be one of"):
        GatedLinearAttention(64, mode="fast")


def test_chunk_and_recurrent_modes_agree():
    torch.manual_seed(1)
    layer = GatedLinearAttention(64, num_heads=2, use_short_conv=True).double().eval()
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    layer.mode = "chunk"
    chunk = layer(x)
    layer.mode = "recurrent"
    assert max_rel_error(layer(x), chunk) < FLOAT_KERNEL_RTOL[torch.float64]


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_leaves_the_real_tokens_unchanged(variant):
    model = tiny_gla(variant)
    prompt = ids(1, 12, seed=3)
    alone = model(prompt, use_cache=False).logits
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(padded, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, 5:]
    assert max_rel_error(out, alone) < FLOAT_KERNEL_RTOL[torch.float64]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_prefill_then_decoding_equals_one_full_forward(variant):
    model = tiny_gla(variant)
    tokens = ids(2, 100, seed=1)
    full = model(tokens, use_cache=False).logits
    out = model(tokens[:, :70], use_cache=True)  # chunk mode
    pieces = [out.logits]
    for start, stop in ((70, 73), (73, 74), (74, 100)):  # recurrent mode: verification-sized and single steps
        pieces.append(model(tokens[:, start:stop], cache=out.cache, use_cache=True).logits)
    assert out.cache.get_seq_length() == 100
    assert max_rel_error(torch.cat(pieces, dim=1), full) < FLOAT_KERNEL_RTOL[torch.float64]


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache_equals_recomputation(variant):
    model = tiny_gla(variant)
    prompt = ids(2, 9, seed=2)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(generated, greedy_by_recomputation(model, prompt, 10))


@pytest.mark.parametrize("variant", ["gla-conv", "hybrid"])
def test_crop_rolls_back_exactly_to_plain_decoding(variant):
    """A verification-sized step and three draft-sized steps, then crop back past all three and part of the first:
    decoding on is bit-identical to never having seen the removed tokens."""
    model = tiny_gla(variant)
    tokens = ids(1, 30, seed=4)
    plain = model(tokens[:, :20], use_cache=True).cache
    rolled = model(tokens[:, :20], use_cache=True).cache
    model(tokens[:, 20:22], cache=plain, use_cache=True)
    model(tokens[:, 20:25], cache=rolled, use_cache=True)
    for t in range(25, 28):
        model(tokens[:, t : t + 1], cache=rolled, use_cache=True)
    rolled.crop(-6)
    assert rolled.get_seq_length() == plain.get_seq_length() == 22
    expected = model(tokens[:, 22:24], cache=plain, use_cache=True).logits
    assert torch.equal(model(tokens[:, 22:24], cache=rolled, use_cache=True).logits, expected)


def test_rollback_reaches_back_max_rollback_tokens_or_the_latest_update():
    model = tiny_gla()
    cache = GLACache(model.config, max_rollback_tokens=4)
    for length in (10, 1, 2):  # the prefill is kept whole; the next token moves the base past it
        model(ids(1, length), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"can roll back 3 tokens \(max_rollback_tokens=4, or the latest update if "
                                         r"longer\), asked for 4"):
        cache.crop(-4)
    cache.crop(-3)
    assert cache.get_seq_length() == 10


def _noisy_copy(variant: str) -> GLAForCausalLM:
    """The same tiny model with noisy weights: a draft that agrees with it often, not always."""
    draft = tiny_gla(variant)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.002)
    return draft


@pytest.mark.parametrize("variant", ["gla-conv", "hybrid"])
def test_speculative_generation_equals_greedy(variant):
    """transformers' assisted generation and ours, with a GLA draft whose rejections make both caches roll back."""
    target, draft = tiny_gla(variant), _noisy_copy(variant)
    prompt = ids(1, 8, seed=5)
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assisted = target.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, assistant_model=draft)
    assert torch.equal(assisted, plain)
    hf_plugins.enable_speculative(target)
    ours = target.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, assistant_model=draft,
                           speculative_config=hf_plugins.SpeculativeConfig(num_draft_tokens=3),
                           return_dict_in_generate=True)
    assert torch.equal(ours.sequences, plain)
    assert 0.1 < ours.speculative_stats["acceptance_rate"] < 0.95


def test_batched_speculative_decoding_refuses_recurrent_states():
    target = tiny_gla()
    hf_plugins.enable_speculative(target)
    with pytest.raises(ValueError, match=r"layers \['GLAStateLayer'\] cannot skip masked slots .* got batch 2"):
        target.generate(ids(2, 6), max_new_tokens=4, do_sample=False, pad_token_id=0,
                        assistant_model=_noisy_copy("gla"))


def test_save_and_reload_through_the_auto_classes(tmp_path):
    model = tiny_gla("hybrid", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "hf_plugins_gla"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, GLAForCausalLM) and reloaded.config.attn_layers == [1]
    prompt = ids(2, 11)
    assert torch.equal(reloaded(prompt).logits, model(prompt).logits)


def test_training_step_reduces_the_loss():
    losses = training_losses(tiny_gla("hybrid", dtype=torch.float32).train(), ids(4, 40, seed=6))
    assert losses[-1] < losses[0] - 0.1


def test_awq_quantizes_a_gla_model(tmp_path):
    model = tiny_gla("gla", dtype=torch.float32, hidden_size=128, intermediate_size=256)
    prompt = ids(2, 16)
    reference = model(prompt).logits
    hf_plugins.quantize(model, hf_plugins.AwqConfig(bits=4, group_size=32, calibration_samples=4,
                                                    calibration_seq_len=32), calibration_data=ids(4, 32, seed=7))
    assert isinstance(model.model.layers[0].attn.q_proj, hf_plugins.AwqLinear)
    quantized = model(prompt).logits
    # W4 g32 on this random model: 8.4 dB measured (the W4A4 contract row's floor is 7 dB; garbage is < 0).
    assert sqnr_db(quantized, reference) > 7
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(prompt).logits, quantized)


def test_a_gla_model_refuses_a_key_value_cache():
    from transformers import DynamicCache

    model = tiny_gla()
    with pytest.raises(TypeError, match="GLAModel needs a GLACache, got DynamicCache"):
        model(ids(1, 4), cache=DynamicCache(), use_cache=True)
    assert isinstance(model(ids(1, 4)).cache, GLACache)
