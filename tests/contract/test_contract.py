"""The contract every quantization plugin row must pass, on tiny random models of several architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import hf_plugins
from tests.contract.char_tokenizer import CALIBRATION_TEXTS, char_tokenizer
from tests.contract.rows import ROWS
from tests.quantizers.tiny_models import TINY_ARCHS, random_token_ids, tiny_model
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error, sqnr_db

ROW_IDS = [row.name for row in ROWS]
PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def _quantized(row, arch, **config_kwargs):
    model, _ = tiny_model(arch)
    reference_logits = model(PROMPT).logits
    hf_plugins.quantize(model, row.make_config(**config_kwargs), calibration_data=random_token_ids(4, 32))
    return model, reference_logits


@pytest.fixture(scope="module")
def quantized_models():
    """(row, arch) -> (quantized model, float logits) built once per module."""
    return {
        (row.name, arch): _quantized(row, arch)
        for row in ROWS
        for arch in TINY_ARCHS
    }


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_quantize_replaces_block_linears_only(row, arch, quantized_models):
    model, _ = quantized_models[(row.name, arch)]
    quantized = [name for name, m in model.named_modules() if isinstance(m, row.quantized_module)]
    float_linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert quantized and all(".layers." in name for name in quantized)
    assert float_linears == ["lm_head"]
    assert model.is_quantized and model.config.quantization_config.quant_method == model.quantization_method


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_forward_close_to_float(row, arch, quantized_models):
    model, reference_logits = quantized_models[(row.name, arch)]
    logits = model(PROMPT).logits
    assert torch.isfinite(logits).all()
    assert sqnr_db(logits, reference_logits) >= row.logits_snr_floor_db


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_generate_with_cache_equals_without(row, arch, quantized_models):
    model, _ = quantized_models[(row.name, arch)]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(PROMPT, use_cache=True, **kwargs)
    uncached = model.generate(PROMPT, use_cache=False, **kwargs)
    assert cached.shape == (1, PROMPT.shape[1] + 6)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_save_reload_bit_identical(row, arch, quantized_models, tmp_path):
    model, _ = quantized_models[(row.name, arch)]
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(tmp_path.glob("*.bin"))
    # The attention implementation is not saved; the tiny models run eager.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert isinstance(reloaded.get_submodule("model.layers.0.mlp.down_proj"), row.quantized_module)
    assert torch.equal(reloaded(PROMPT).logits, model(PROMPT).logits)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_checkpoint_without_plugin_fails_loudly(row, quantized_models, tmp_path):
    model, _ = quantized_models[(row.name, "llama")]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hf_plugins_quantized" and saved["hf_plugins_base_model_type"] == "llama"
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert result.returncode != 0
    assert "does not recognize this architecture" in result.stderr


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_from_pretrained_quantizes_like_the_helper(row, tmp_path):
    float_model, _ = tiny_model("qwen2")
    float_model.save_pretrained(tmp_path / "float")
    tokenizer = char_tokenizer()
    in_loader = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float",
        quantization_config=row.make_config(calibration=CALIBRATION_TEXTS, tokenizer=tokenizer),
        attn_implementation="eager",
    )
    helper = AutoModelForCausalLM.from_pretrained(tmp_path / "float", attn_implementation="eager")
    config = row.make_config()
    hf_plugins.quantize(helper, config, calibration_data=CALIBRATION_TEXTS, tokenizer=tokenizer)
    assert config.modules_to_not_convert is None, "the user's config must not be mutated"
    assert torch.equal(in_loader(PROMPT).logits, helper(PROMPT).logits)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_reload_in_bfloat16(row, quantized_models, tmp_path):
    model, _ = quantized_models[(row.name, "mistral")]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    logits = reloaded(PROMPT).logits
    assert logits.dtype == torch.bfloat16
    # A whole bf16 network accumulates rounding over its layers: a few per-op tolerances.
    assert max_rel_error(logits, model(PROMPT).logits) <= 8 * FLOAT_KERNEL_RTOL[torch.bfloat16]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_peft_lora_trains_on_top(row, quantized_models):
    model, _ = _quantized(row, "llama")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(PROMPT).logits
    lora = hf_plugins.register_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model = get_peft_model(model, lora)
    # B starts at zero, so the adapted model starts exactly at the quantized one.
    assert torch.equal(peft_model(PROMPT).logits, base_logits)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    labels = PROMPT.clone()
    losses = []
    for _ in range(5):
        loss = peft_model(PROMPT, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base_state = peft_model.get_base_model().state_dict()
    for key, value in frozen.items():
        peft_key = key.replace(".q_proj.", ".q_proj.base_layer.").replace(".v_proj.", ".v_proj.base_layer.")
        peft_key = peft_key.replace(".down_proj.", ".down_proj.base_layer.")
        assert torch.equal(base_state[peft_key], value), f"{key} changed during LoRA training"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_configs_raise_clear_errors(row):
    for kwargs, error, message in row.bad_configs:
        with pytest.raises(error, match=message):
            row.make_config(**kwargs)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_quantizing_twice_is_refused(row, quantized_models):
    model, _ = quantized_models[(row.name, "llama")]
    with pytest.raises(ValueError, match="already quantized"):
        hf_plugins.quantize(model, row.make_config(), calibration_data=random_token_ids(2, 16))
