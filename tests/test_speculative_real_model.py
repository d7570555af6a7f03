"""Speculative decoding on a packaged real model: lossless greedy output with self-drafts, batch 1 and batched."""

import pytest
import torch

import hf_plugins
from hf_plugins import SpeculativeConfig
from hf_plugins.assets import load_model, load_text

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def _prompts(tokenizer, count: int) -> list[torch.Tensor]:
    docs = load_text("wiki", "evaluation")[: count // 2] + load_text("code", "evaluation")[: count - count // 2]
    return [tokenizer(doc[:400], return_tensors="pt").input_ids[:, :64] for doc in docs]


@pytest.mark.parametrize(
    ("draft_kwargs", "min_acceptance"),
    # Skipping layers without training leaves a weak draft (SmolLM2: ~4% accepted); only losslessness is asserted.
    [(dict(bits=4), 0.3), (dict(bits=None, layers=20), 0.0)],
    ids=["int4-self-draft", "layer-skip-20-of-30"],
)
def test_greedy_identity_with_self_drafts(smollm2, draft_kwargs, min_acceptance):
    model, tokenizer = smollm2
    draft = hf_plugins.self_draft(model, **draft_kwargs)
    accepted = drafted = 0
    for ids in _prompts(tokenizer, 6):
        plain = model.generate(ids, max_new_tokens=32, do_sample=False)
        out = model.generate(ids, assistant_model=draft, max_new_tokens=32, do_sample=False,
                             return_dict_in_generate=True, speculative_config=SpeculativeConfig(num_draft_tokens=3))
        assert torch.equal(out.sequences, plain)
        accepted += out.speculative_stats["accepted"]
        drafted += out.speculative_stats["drafted"]
    assert drafted > 0 and accepted / drafted >= min_acceptance


def test_batched_identity_with_layer_parallel_drafting(smollm2):
    model, tokenizer = smollm2
    draft = hf_plugins.self_draft(model, bits=4)
    tokenizer.padding_side = "left"
    docs = load_text("wiki", "evaluation")[:2] + load_text("code", "evaluation")[:2]
    batch = tokenizer([doc[: 120 + 60 * i] for i, doc in enumerate(docs)], return_tensors="pt", padding=True)
    plain = model.generate(**batch, max_new_tokens=24, do_sample=False)
    for group in (1, 3):
        out = model.generate(**batch, assistant_model=draft, max_new_tokens=24, do_sample=False,
                             speculative_config=SpeculativeConfig(layer_parallel_group_size=group))
        assert torch.equal(out, plain), f"layer_parallel_group_size={group}"


def test_stop_strings_stop_each_row_like_plain_generate(smollm2):
    model, tokenizer = smollm2
    draft = hf_plugins.self_draft(model, bits=4)
    tokenizer.padding_side = "left"
    batch = tokenizer([doc[:200] for doc in load_text("code", "evaluation")[:2]], return_tensors="pt", padding=True)
    plain_full = model.generate(**batch, max_new_tokens=24, do_sample=False)
    width = batch.input_ids.shape[1]
    stop = tokenizer.decode(plain_full[0, width + 6 : width + 8])  # text row 0 produces mid-way
    kwargs = dict(max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    plain = model.generate(**batch, **kwargs)
    out = model.generate(**batch, assistant_model=draft, **kwargs)
    assert torch.equal(out, plain)
    assert plain.shape[1] < plain_full.shape[1] or (plain[0, width + 8 :] == tokenizer.pad_token_id).all()
