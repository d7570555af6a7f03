"""Greedy speculative decoding is token-identical to plain greedy: many prompts, architectures, drafts, batches."""

import pytest
import torch

import hf_plugins
from hf_plugins import SpeculativeConfig
from hf_plugins.generation import is_speculative_enabled
from tests.quantizers.tiny_models import TINY_ARCHS, VOCAB_SIZE, tiny_model

PROMPTS_PER_ARCH = 9  # x 6 architectures = 54 prompts per draft kind


def _prompts(count: int, seed: int) -> list[torch.Tensor]:
    """Random prompts of 2..20 tokens that avoid the pad/eos ids (0..2), like real tokenised text."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 21, (count,), generator=gen)
    return [torch.randint(3, VOCAB_SIZE, (1, int(n)), generator=gen) for n in lengths]


def _drafts(target, kind: str):
    if kind == "separate-checkpoint":
        arch = target.config.model_type
        return tiny_model(arch, seed=1)[0].to(target.dtype)
    if kind == "layer-skip":
        return hf_plugins.self_draft(target, bits=None, layers=1)
    return hf_plugins.self_draft(target, bits=4, group_size=32)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("draft_kind", ["separate-checkpoint", "layer-skip", "int4-self-draft"])
def test_greedy_output_equals_plain_greedy(arch, draft_kind):
    # float64 makes near-tie argmax flips between 1-token and (k+1)-token forwards vanishingly unlikely; the int4
    # kernels take fp32 only.
    dtype = torch.float32 if draft_kind == "int4-self-draft" else torch.float64
    target = tiny_model(arch)[0].to(dtype)
    draft = _drafts(target, draft_kind)
    hf_plugins.enable_speculative(target)
    accepted = drafted = 0
    for prompt in _prompts(PROMPTS_PER_ARCH, seed=TINY_ARCHS.index(arch)):
        plain = target.generate(prompt, max_new_tokens=24, do_sample=False, speculative_config=None)
        # The adaptive draft length follows measured times; the int4 draft pins it so its acceptance is exact.
        config = SpeculativeConfig(num_draft_tokens=3) if draft_kind == "int4-self-draft" else None
        out = target.generate(prompt, assistant_model=draft, max_new_tokens=24, do_sample=False,
                              return_dict_in_generate=True, speculative_config=config)
        assert torch.equal(out.sequences, plain)
        accepted += out.speculative_stats["accepted"]
        drafted += out.speculative_stats["drafted"]
    assert drafted > 0
    if draft_kind == "int4-self-draft":  # a 4-bit copy agrees often even with a tiny random model's flat logits
        assert accepted / drafted > 0.3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize(("group_size", "draft_context"), [(1, None), (2, None), (1, 4), (2, 4)])
def test_batch_rows_equal_plain_batched_greedy(arch, group_size, draft_context):
    if group_size > 1 and arch == "gemma2":
        pytest.skip("layer-parallel drafting covers Llama-style attention")
    target = tiny_model(arch)[0].double()
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB_SIZE, (6, 15), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 9, 1, 12, 5]):  # ragged left padding
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, max_new_tokens=30, do_sample=False,
                          speculative_config=SpeculativeConfig(num_draft_tokens=3, draft_context=draft_context,
                                                               layer_parallel_group_size=group_size),
                          return_dict_in_generate=True)
    assert out.sequences.shape == plain.shape
    for row in range(ids.shape[0]):
        assert torch.equal(out.sequences[row], plain[row]), f"row {row} differs"
    # Rows accepted different numbers of drafts in some step, so the holes were exercised.
    assert 0 < out.speculative_stats["acceptance_rate"] < 1


def test_rows_stopping_at_eos_are_padded_like_plain_greedy():
    target = tiny_model("llama")[0].double()
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    ids = torch.randint(3, VOCAB_SIZE, (4, 6), generator=torch.Generator().manual_seed(3))
    plain = target.generate(ids, max_new_tokens=20, do_sample=False)
    # Make a token that plain greedy emits mid-way in row 0 the end-of-sequence token.
    eos = int(plain[0, 6 + 5])
    plain_eos = target.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    batch_sizes = []
    hook = target.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    finally:
        hook.remove()
    assert torch.equal(out, plain_eos)
    assert (plain_eos[0, 6 + 6 :] == 0).all()
    # Rows leave the batch once they end (row 0 at EOS, the others at max length after different acceptances).
    assert batch_sizes[0] == 4 and min(batch_sizes) < 4
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_repetition_penalty_and_min_length_are_applied_per_row_as_plain_decoding():
    target = tiny_model("qwen2")[0].double()
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    ids = torch.randint(3, VOCAB_SIZE, (3, 8), generator=torch.Generator().manual_seed(11))
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.3, min_new_tokens=10, eos_token_id=5,
                  pad_token_id=0)
    plain = target.generate(ids, **kwargs)
    out = target.generate(ids, assistant_model=draft, **kwargs)
    assert torch.equal(out, plain)


def test_streamer_receives_prompt_then_every_new_token():
    class Collect:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    target = tiny_model("llama")[0].double()
    draft = hf_plugins.self_draft(target, bits=None, layers=1)
    ids = torch.randint(3, VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(2))
    streamer = Collect()
    out = target.generate(ids, assistant_model=draft, max_new_tokens=15, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 5:].tolist()
    assert streamer.ended


def test_self_draft_enables_the_target_and_quantized_models_are_enabled_on_quantize():
    target = tiny_model("llama")[0]
    assert not is_speculative_enabled(target)
    hf_plugins.self_draft(target, bits=4, group_size=32)
    assert is_speculative_enabled(target)
    quantized = tiny_model("qwen2")[0]
    calibration = torch.randint(3, VOCAB_SIZE, (4, 32), generator=torch.Generator().manual_seed(0))
    hf_plugins.quantize(quantized, hf_plugins.AwqConfig(bits=4, group_size=32), calibration_data=calibration)
    assert is_speculative_enabled(quantized)


def test_quantized_target_with_its_own_layer_skip_draft_is_lossless():
    target = tiny_model("qwen2")[0]
    calibration = torch.randint(3, VOCAB_SIZE, (4, 32), generator=torch.Generator().manual_seed(0))
    hf_plugins.quantize(target, hf_plugins.AwqConfig(bits=4, group_size=32), calibration_data=calibration)
    draft = hf_plugins.self_draft(target, bits=None, layers=1)  # shares the quantized layer as it is
    ids = torch.randint(3, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(4))
    plain = target.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False), plain)

