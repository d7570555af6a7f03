"""The 4-bit KV cache: quantizer error bound, crop / row selection, generate, speculative decoding, the W4A4KV4
config making it the default."""

import pytest
import torch
from transformers import DynamicCache

import hf_plugins
from hf_plugins import KV4Cache, SpeculativeConfig, W4A4KV4Config
from hf_plugins.attention import KV4_ATTENTION
from hf_plugins.generation.kv4_cache import quantize_kv
from hf_plugins.kernels.kv4_attention import PackedKV, dequantize_packed
from tests.quantizers.tiny_models import VOCAB_SIZE, random_token_ids, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error


@pytest.mark.parametrize("group_size", [16, 64])
def test_round_trip_error_is_at_most_half_a_step(group_size):
    states = torch.randn(2, 3, 7, 64) * torch.linspace(0.1, 20, 64)
    codes, scale, minimum = quantize_kv(states, group_size)
    assert codes.shape == (2, 3, 7, 32) and codes.dtype == torch.uint8
    assert scale.shape == (2, 3, 7, 64 // group_size) and scale.dtype == torch.float16
    restored = dequantize_packed(PackedKV(codes, scale, minimum, group_size, torch.float32))
    step = scale.float().repeat_interleave(group_size, dim=-1)
    # Half a step of rounding, plus the fp16 rounding of the minimum the codes were computed against.
    assert ((restored - states).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize(("groups", "fraction"), [((32, 32), 20 / 64), ((64, 64), 36 / 128),
                                                 ((32, 64), (20 / 64 + 36 / 128) / 2)])
def test_bytes_per_value_are_half_a_byte_plus_the_group_scales(groups, fraction):
    cache = KV4Cache(tiny_model("llama")[0].config, *groups, key_scheme="token")
    states = torch.randn(1, 2, 4096, 64)
    cache.update(states, states, 0)
    assert cache.dense_nbytes() == 2 * states.numel() * 2
    assert cache.nbytes() / cache.dense_nbytes() == pytest.approx(fraction)


def test_keys_with_an_outlier_pair_are_quantized_pairwise_and_reconstruct_better():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 40, 64, generator=gen)
    angle = torch.linspace(0, 3, 40)
    keys[..., 5], keys[..., 37] = 60 * torch.cos(angle), 60 * torch.sin(angle)  # a rotating offset, as RoPE makes
    errors = {}
    for scheme in (None, "token"):
        cache = KV4Cache(tiny_model("llama")[0].config, 32, key_scheme=scheme)
        restored, _ = cache.update(keys, keys, 0)
        errors[cache.layers[0].key_scheme] = (restored - keys).pow(2).sum() / keys.pow(2).sum()
    assert set(errors) == {"pair", "token"} and errors["pair"] < errors["token"] / 2
    plain = KV4Cache(tiny_model("llama")[0].config, 32)
    plain.update(torch.randn(1, 2, 40, 64, generator=gen), torch.randn(1, 2, 40, 64, generator=gen), 0)
    assert plain.layers[0].key_scheme == "token"


@pytest.mark.parametrize("key_scheme", ["token", "pair"])
def test_crop_and_row_selection_keep_what_was_never_removed(key_scheme):
    model, _ = tiny_model("llama")
    cache = KV4Cache(model.config, group_size=16, key_scheme=key_scheme)
    keys, values = torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    full_k, full_v = cache.update(keys, values, 0)
    cache.crop(-4)
    assert cache.get_seq_length(0) == 5
    k, v = cache.update(keys[:, :, 5:], values[:, :, 5:], 0)  # re-appending restores exactly the same codes
    assert torch.equal(k, full_k) and torch.equal(v, full_v)
    cache.layers[0].batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0].dequantized("k"), full_k[[2, 0]])
    with pytest.raises(ValueError, match="KV4Layer.crop takes a negative count of tokens to remove, got 3"):
        cache.crop(3)


def test_groups_must_divide_the_head_dimension():
    cache = KV4Cache(tiny_model("llama")[0].config, group_size=12)
    with pytest.raises(ValueError, match="groups of 12 channels must be even and divide the head dimension 16"):
        cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_generate_with_kv4_stays_close_to_the_float_cache(arch):
    model, _ = tiny_model(arch)
    ids = random_token_ids(2, 12, seed=3)
    float_logits = model(ids, cache=DynamicCache(config=model.config)).logits
    kv4 = KV4Cache(model.config, group_size=16)
    prefill = model(ids[:, :-1], cache=kv4, use_cache=True)
    last = model(ids[:, -1:], cache=prefill.cache, use_cache=True).logits
    # Every query reads the dequantized K/V, its own token's included: prefill, decoding and speculative
    # verification then see the same numbers. (Tiny random models have large outlier gains; SmolLM2's
    # perplexity test in test_w4a4kv4_real_model.py is the quality check.)
    error = (last[:, -1] - float_logits[:, -1]).abs().max() / float_logits[:, -1].abs().max()
    assert 0 < error < 0.25
    out = model.generate(ids, cache=KV4Cache(model.config, group_size=16), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 17)


def test_speculative_decoding_on_a_kv4_target_equals_plain_kv4_greedy():
    target = tiny_model("llama")[0].double()
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    ids = torch.randint(3, VOCAB_SIZE, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    plain = target.generate(ids, attention_mask=mask, cache=KV4Cache(target.config, 16), max_new_tokens=20,
                            do_sample=False)
    hf_plugins.enable_speculative(target)
    fast = target.generate(ids, attention_mask=mask, cache=KV4Cache(target.config, 16), max_new_tokens=20,
                           do_sample=False, assistant_model=draft,
                           speculative_config=SpeculativeConfig(num_draft_tokens=3))
    assert torch.equal(fast, plain)


def test_kv_bits_4_makes_generate_use_the_kv4_cache(tmp_path):
    model, _ = tiny_model("qwen2")
    model.set_attn_implementation("sdpa")  # transformers' default; the tiny models use eager
    hf_plugins.quantize(model, W4A4KV4Config(outlier_blocks=0, kv_group_size=16))
    out = model.generate(random_token_ids(1, 6), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, KV4Cache) and out.cache.get_seq_length() == 8
    assert model.config._attn_implementation == KV4_ATTENTION and out.cache.layers[0].packed_outputs
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    again = reloaded.generate(random_token_ids(1, 6), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(again.cache, KV4Cache) and torch.equal(again.sequences, out.sequences)
    # The user's choice of attention is kept; the cache then hands it dense tensors.
    assert reloaded.config._attn_implementation == "eager" and not again.cache.layers[0].packed_outputs
    plain, _ = tiny_model("qwen2")
    hf_plugins.quantize(plain, W4A4KV4Config(outlier_blocks=0, kv_bits=16))
    assert isinstance(plain.generate(random_token_ids(1, 6), max_new_tokens=2, return_dict_in_generate=True).cache,
                      DynamicCache)


def _steps_logits(model, ids, mask, cache):
    """Logits of a prefill, a 3-token verification step and a 1-token decode step through ``cache``."""
    logits = []
    for start, stop in ((0, 9), (9, 12), (12, 13)):
        out = model(ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_packed_kv4_attention_equals_the_dense_kv4_cache(arch, backend, monkeypatch):
    """The attention function reading packed codes (the Triton kernel under the interpreter, or the float64
    reference) gives the logits of SDPA over the dequantized cache: left padding, grouped-query heads, both key
    schemes, a multi-token verification step."""
    model, _ = tiny_model(arch)
    ids = random_token_ids(2, 13, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for scheme in ("token", "pair"):
        dense = _steps_logits(model, ids, mask, KV4Cache(model.config, 16, key_scheme=scheme))
        model.set_attn_implementation(KV4_ATTENTION)
        monkeypatch.setenv("HF_PLUGINS_BACKEND", backend)
        packed = _steps_logits(model, ids, mask, KV4Cache(model.config, 16, key_scheme=scheme, packed_outputs=True))
        monkeypatch.delenv("HF_PLUGINS_BACKEND")
        model.set_attn_implementation("sdpa")
        real = mask.bool()[:, :, None].expand_as(dense)
        assert max_rel_error(packed[real], dense[real]) < FLOAT_KERNEL_RTOL[torch.float32]


def test_kv4_attention_leaves_dense_keys_to_sdpa():
    model, _ = tiny_model("llama")
    ids = random_token_ids(2, 7, seed=2)
    model.set_attn_implementation("sdpa")
    expected = model(ids).logits
    model.set_attn_implementation(KV4_ATTENTION)
    assert torch.equal(model(ids).logits, expected)
