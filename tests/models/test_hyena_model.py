"""The Hyena model family: config validation, cached decoding (O(context) per token) vs full forwards, left
padding, generate, crop for speculative decoding, save/reload through the Auto classes and training."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

import hf_plugins
from hf_plugins import HyenaCache, HyenaConfig, HyenaForCausalLM
from tests.models.lm_checks import greedy_by_recomputation, training_losses
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error, sqnr_db

VOCAB = 96


def tiny_hyena(dtype=torch.float64, **overrides) -> HyenaForCausalLM:
    """A 2-block Hyena LM (width 32, filters of 128 taps) with random weights, in eval mode."""
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128,
                intermediate_size=64, filter_dim=16, eos_token_id=None)
    return AutoModelForCausalLM.from_config(HyenaConfig(**{**base, **overrides})).to(dtype).eval()


def ids(batch: int, tokens: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(order=1), r"HyenaConfig\.order must be >= 2 \(order - 1 long convolutions\), got 1"),
    (dict(filter_emb_dim=8), r"filter_emb_dim must be odd and >= 3 .* got 8"),
    (dict(keep_frequencies=1.5), r"keep_frequencies must be in \(0, 1\] or None, got 1\.5"),
])
def test_config_rejects_inconsistent_values(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        HyenaConfig(**kwargs)


@pytest.mark.parametrize("order", [2, 3])
def test_cached_prefill_then_decoding_equals_one_full_forward(order):
    model = tiny_hyena(order=order)
    tokens = ids(2, 40, seed=1)
    full = model(tokens, use_cache=False).logits
    out = model(tokens[:, :30], use_cache=True)
    pieces = [out.logits]
    for start, stop in ((30, 33), (33, 34), (34, 40)):
        pieces.append(model(tokens[:, start:stop], cache=out.cache, use_cache=True).logits)
    assert out.cache.get_seq_length() == 40
    assert max_rel_error(torch.cat(pieces, dim=1), full) < FLOAT_KERNEL_RTOL[torch.float64]


def test_decoding_past_the_filter_length_equals_a_full_forward():
    """Beyond ``max_position_embeddings`` taps the filters stop: cached and full forwards agree there too."""
    model = tiny_hyena(max_position_embeddings=16)
    tokens = ids(1, 30, seed=2)
    full = model(tokens, use_cache=False).logits
    out = model(tokens[:, :20], use_cache=True)
    steps = [model(tokens[:, t : t + 1], cache=out.cache, use_cache=True).logits for t in range(20, 30)]
    assert max_rel_error(torch.cat([out.logits, *steps], dim=1), full) < FLOAT_KERNEL_RTOL[torch.float64]


def test_left_padding_leaves_the_real_tokens_unchanged():
    model = tiny_hyena()
    prompt = ids(1, 12, seed=3)
    alone = model(prompt, use_cache=False).logits
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    out = model(padded, attention_mask=mask, use_cache=False).logits[:, 5:]
    assert max_rel_error(out, alone) < FLOAT_KERNEL_RTOL[torch.float64]


def test_generate_with_cache_equals_recomputation():
    model = tiny_hyena()
    prompt = ids(2, 9, seed=2)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(generated, greedy_by_recomputation(model, prompt, 10))


def test_crop_is_a_slice_and_speculative_generation_equals_greedy():
    model = tiny_hyena()
    tokens = ids(1, 30, seed=4)
    cache = model(tokens[:, :20], use_cache=True).cache
    model(tokens[:, 20:25], cache=cache, use_cache=True)
    cache.crop(-3)
    assert cache.get_seq_length() == 22
    plain = model(tokens[:, :22], use_cache=True).cache
    expected = model(tokens[:, 22:24], cache=plain, use_cache=True).logits
    assert max_rel_error(model(tokens[:, 22:24], cache=cache, use_cache=True).logits, expected) < \
        FLOAT_KERNEL_RTOL[torch.float64]
    draft = tiny_hyena(num_hidden_layers=1)
    prompt = ids(1, 8, seed=5)
    greedy = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                      assistant_model=draft), greedy)
    hf_plugins.enable_speculative(model)
    ours = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0, assistant_model=model,
                          speculative_config=hf_plugins.SpeculativeConfig(num_draft_tokens=3))
    assert torch.equal(ours, greedy)
    with pytest.raises(ValueError, match=r"layers \['HyenaStateLayer'\] cannot skip masked slots"):
        model.generate(ids(2, 6), max_new_tokens=4, do_sample=False, pad_token_id=0, assistant_model=draft)


def test_save_and_reload_through_the_auto_classes(tmp_path):
    model = tiny_hyena(dtype=torch.float32, keep_frequencies=0.5)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "hf_plugins_hyena"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, HyenaForCausalLM) and reloaded.config.keep_frequencies == 0.5
    prompt = ids(2, 11)
    assert torch.equal(reloaded(prompt).logits, model(prompt).logits)


def test_training_step_reduces_the_loss():
    losses = training_losses(tiny_hyena(dtype=torch.float32).train(), ids(4, 40, seed=6))
    assert losses[-1] < losses[0] - 0.1


def test_a_hyena_model_refuses_another_cache():
    from transformers import DynamicCache

    model = tiny_hyena()
    with pytest.raises(TypeError, match="HyenaModel needs a HyenaCache, got DynamicCache"):
        model(ids(1, 4), cache=DynamicCache(), use_cache=True)
    assert isinstance(model(ids(1, 4)).cache, HyenaCache)
    assert hf_plugins.HyenaConfig is HyenaConfig


def test_awq_quantizes_a_hyena_model_but_not_its_filter_networks(tmp_path):
    model = tiny_hyena(dtype=torch.float32, hidden_size=128, intermediate_size=256)
    prompt = ids(2, 16)
    reference = model(prompt).logits
    hf_plugins.quantize(model, hf_plugins.AwqConfig(bits=4, group_size=32, calibration_samples=4,
                                                    calibration_seq_len=32), calibration_data=ids(4, 32, seed=7))
    mixer = model.model.layers[0].mixer
    assert isinstance(mixer.in_proj, hf_plugins.AwqLinear) and type(mixer.filter.mlp[0]) is torch.nn.Linear
    quantized = model(prompt).logits
    assert sqnr_db(quantized, reference) > 12  # 19.0 dB measured
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(prompt).logits, quantized)


def test_bf16_loading_keeps_the_filter_networks_in_fp32(tmp_path):
    tiny_hyena(dtype=torch.float32).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mixer.filter.mlp[0].weight.dtype == torch.float32
    assert torch.isfinite(model(ids(1, 8)).logits).all()


def test_triton_gated_kernels_train_like_the_cpu_path(monkeypatch):
    """Without a cache the operator runs each long convolution as one gated ``fft_conv`` (skip folded into tap 0,
    gates in the kernel): the Triton kernels (interpreter) give the CPU path's loss and gradients."""
    tokens = ids(3, 50, seed=4)  # batch 3: a pair of rows and a lone one per channel

    def loss_and_grads(backend: str):
        monkeypatch.setenv("HF_PLUGINS_BACKEND", backend)
        model = tiny_hyena(torch.float32, order=3).train()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads("cpu")
    triton_loss, triton_grads = loss_and_grads("triton")
    assert grads.keys() == triton_grads.keys() and any("filter" in name for name in grads)
    assert max_rel_error(triton_loss, loss) < FLOAT_KERNEL_RTOL[torch.float32]
    for name, grad in grads.items():
        assert max_rel_error(triton_grads[name], grad) < FLOAT_KERNEL_RTOL[torch.float32], name
