"""Speculative decoding on a packaged real model: lossless greedy output with self-drafts, batch 1 and batched."""

import copy

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


def _first_difference_is_a_bf16_near_tie(model, plain: torch.Tensor, out: torch.Tensor, ulps: int = 4) -> bool:
    """Whether two greedy continuations of one prompt agree up to a step where the model's two best logits lie
    within ``ulps`` bf16 rounding steps, and the other one took the runner-up: a rounding flip between the
    1-token and (k+1)-token forwards, not an error (an error would pick a token far from the best)."""
    diff = (plain[0] != out[0]).nonzero()
    if len(diff) == 0:
        return True
    step = int(diff[0])
    with torch.no_grad():
        logits = model(plain[:, :step]).logits[0, -1].float()
    best, runner_up = logits.topk(2).values.tolist()
    ulp = 2.0 ** (torch.tensor(abs(best)).log2().floor().item() - 7)
    return int(out[0, step]) in logits.topk(2).indices.tolist() and best - runner_up <= ulps * ulp


def test_bf16_model_greedy_identity_on_this_cpu(smollm2):
    """The CPU fast linears pick per dtype what this CPU runs (oneDNN bf16 needs AVX-512; AVX2 takes F.linear):
    a bf16 model's speculative output equals its plain greedy output whichever route was taken, up to bf16
    near-ties (seen on AVX2: best logits 17.5 and 17.375, one bf16 step apart, swap between the 1-token and the
    4-token forward; transformers' own assisted generation shares this)."""
    model, tokenizer = smollm2
    target = copy.deepcopy(model).to(torch.bfloat16)
    hf_plugins.enable_speculative(target)
    draft = hf_plugins.self_draft(target, bits=None, layers=20)
    drafted = identical = 0
    prompts = _prompts(tokenizer, 3)
    for ids in prompts:
        plain = target.generate(ids, max_new_tokens=24, do_sample=False)
        out = target.generate(ids, assistant_model=draft, max_new_tokens=24, do_sample=False,
                              return_dict_in_generate=True, speculative_config=SpeculativeConfig(num_draft_tokens=3))
        assert out.sequences.shape == plain.shape
        assert _first_difference_is_a_bf16_near_tie(target, plain, out.sequences)
        identical += torch.equal(out.sequences, plain)
        drafted += out.speculative_stats["drafted"]
    assert drafted > 0 and identical >= 1
