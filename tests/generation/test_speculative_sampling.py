"""Speculative sampling follows the target's distribution exactly (a goodness-of-fit test on a 6-token vocabulary)."""

import pytest
import torch
import transformers

import hf_plugins
from hf_plugins import SpeculativeConfig
from hf_plugins.generation import greedy_accept, rejection_sample
from tests.tolerances import SAMPLING_SIGNIFICANCE

VOCAB = 6
NEW_TOKENS = 3
SAMPLES = 6000
TEMPERATURE = 0.8


def _small_vocab_llama(seed: int) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def _exact_joint(model, prompt: torch.Tensor) -> torch.Tensor:
    """``[VOCAB ** NEW_TOKENS]`` probability of every continuation under ``model`` at TEMPERATURE."""
    grid = torch.cartesian_prod(*[torch.arange(VOCAB)] * NEW_TOKENS)
    ids = torch.cat([prompt.expand(len(grid), -1), grid], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, prompt.shape[1] - 1 : -1] / TEMPERATURE
    step_probs = logits.softmax(-1).gather(2, grid[..., None]).squeeze(2)
    return step_probs.prod(dim=1)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; cells expecting fewer than 5 samples are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def _cell_counts(continuations: torch.Tensor) -> torch.Tensor:
    index = torch.zeros(len(continuations), dtype=torch.long)
    for column in range(NEW_TOKENS):
        index = index * VOCAB + continuations[:, column]
    return torch.bincount(index, minlength=VOCAB**NEW_TOKENS).double()


@pytest.mark.parametrize("group_size", [1, 2])
def test_sampled_continuations_follow_the_target_distribution(group_size):
    target, draft = _small_vocab_llama(0), _small_vocab_llama(1)
    hf_plugins.enable_speculative(target)
    prompt = torch.tensor([[1, 4, 2]])
    p_target = _exact_joint(target, prompt)
    p_draft = _exact_joint(draft, prompt)
    torch.manual_seed(1234)
    out = target.generate(
        prompt.expand(SAMPLES, -1), assistant_model=draft, do_sample=True, temperature=TEMPERATURE, top_k=0,
        max_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True,
        speculative_config=SpeculativeConfig(num_draft_tokens=2, layer_parallel_group_size=group_size),
    )
    counts = _cell_counts(out.sequences[:, prompt.shape[1] :])
    assert _chi_square_p_value(counts, p_target) > SAMPLING_SIGNIFICANCE
    # The test has power: the draft's own law, sampled as often, is rejected, and some drafts were rejected.
    draft_counts = _cell_counts(
        torch.stack(torch.unravel_index(torch.multinomial(p_draft, SAMPLES, replacement=True), (VOCAB,) * NEW_TOKENS), 1)
    )
    assert _chi_square_p_value(draft_counts, p_target) < SAMPLING_SIGNIFICANCE
    assert 0 < out.speculative_stats["acceptance_rate"] < 1


def test_rejection_sampling_accepts_everything_when_draft_equals_target():
    probs = torch.softmax(torch.randn(5, 4, 7, dtype=torch.float64), -1)
    tokens = torch.multinomial(probs[:, :3].reshape(-1, 7), 1).view(5, 3)
    accepted, _ = rejection_sample(tokens, probs[:, :3], probs)
    assert accepted.tolist() == [3] * 5


def test_rejection_sampling_rejects_tokens_the_target_cannot_produce():
    target = torch.zeros(2, 3, 4, dtype=torch.float64)
    target[..., 0] = 1.0  # the target only ever says token 0
    draft = torch.zeros(2, 2, 4, dtype=torch.float64)
    draft[..., 3] = 1.0
    accepted, next_token = rejection_sample(torch.full((2, 2), 3), draft, target)
    assert accepted.tolist() == [0, 0]
    assert next_token.tolist() == [0, 0]


def test_greedy_accept_counts_the_matching_prefix_and_returns_the_targets_next_token():
    scores = torch.zeros(3, 4, 5)
    target_tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    scores.scatter_(2, target_tokens[..., None], 1.0)
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [0, 2, 3]])
    accepted, next_token = greedy_accept(drafts, scores)
    assert accepted.tolist() == [3, 1, 0]
    assert next_token.tolist() == [4, 2, 1]
