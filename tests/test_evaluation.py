"""Perplexity over sliding windows against a per-token brute-force oracle, and its evaluate metric offline."""

import copy
import math
import socket

import pytest
import torch

from hf_plugins.evaluation import PERPLEXITY_METRIC_PATH, load_perplexity_metric, perplexity

# The windowed model pass and the per-token oracle differ only in float32 summation order.
PPL_RTOL = 1e-5
VOCAB = 256
TEXTS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun of the afternoon "
    "and the birds sing a song about rivers mountains and the long road home",
    "a tokenizer splits text into pieces and a model predicts the next piece from the ones before it",
    "short one",
    "",
    "perplexity is the exponential of the mean negative log likelihood per token over the whole corpus "
    "measured with windows that slide over each document so every token is scored once",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and spinning threads stall badly on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # A small vocabulary keeps words split into several tokens: longer documents than words.
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A larger init than the default 0.02 makes predictions depend more on the context, so that a wrong window
    # scheme changes the result well beyond the tolerance (see test_window_scheme_changes_result).
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
    )
    return LlamaForCausalLM(config).eval()


def _token_nll(model, context, target):
    """NLL (nats, float64) of ``target`` after ``context`` ``[c]``, from one plain forward pass."""
    logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
    return -torch.log_softmax(logits, -1)[target].item()


def _oracle(model, tokenizer, texts, span, stride, prefix):
    """Brute force: each token's NLL from its own forward pass over exactly the context the scheme gives it.

    Token ``i`` is scored in window ``k = 0`` when ``i < span``, else ``k = (i - span) // stride + 1`` (the first
    window reaching past it); its context is ``[prefix] + ids[k * stride : i]``. Returns (nll_sum, n_tokens).
    """
    head = [] if prefix is None else [prefix]
    nll_sum, n_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for i, target in enumerate(ids):
                begin = 0 if i < span else ((i - span) // stride + 1) * stride
                context = head + ids[begin:i]
                if context:
                    nll_sum += _token_nll(model, context, target)
                    n_tokens += 1
    return nll_sum, n_tokens


def _expected_count(tokenizer, texts, span, stride, bos):
    """Scored tokens by the closed forms of the module docstring."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if bos:
        return sum(lengths)
    if stride < span:
        return sum(max(n - 1, 0) for n in lengths)
    return sum(n - math.ceil(n / span) for n in lengths)


@pytest.mark.parametrize(
    "window, stride, add_bos",
    [
        pytest.param(9, None, True, id="W9-nonoverlap-bos"),
        pytest.param(9, 3, True, id="W9-S3-bos"),
        pytest.param(8, None, False, id="W8-nonoverlap-nobos"),
        pytest.param(8, 5, False, id="W8-S5-nobos"),
        pytest.param(2, 1, True, id="W2-S1-bos"),
    ],
)
def test_perplexity_matches_oracle(model, tokenizer, window, stride, add_bos):
    result = perplexity(model, tokenizer, TEXTS, window=window, stride=stride, add_bos=add_bos, progress=False)
    span = window - add_bos
    prefix = tokenizer.bos_token_id if add_bos else None
    nll_sum, n_tokens = _oracle(model, tokenizer, TEXTS, span, stride or span, prefix)
    assert result.n_tokens == n_tokens == _expected_count(tokenizer, TEXTS, span, stride or span, add_bos)
    assert result.nll_sum == pytest.approx(nll_sum, rel=PPL_RTOL)
    assert result.perplexity == pytest.approx(math.exp(nll_sum / n_tokens), rel=PPL_RTOL)


def test_window_scheme_changes_result(model, tokenizer):
    """Guards the oracle test's power: overlapping windows give measurably different numbers on this model."""
    plain = perplexity(model, tokenizer, TEXTS, window=9, progress=False)
    strided = perplexity(model, tokenizer, TEXTS, window=9, stride=2, progress=False)
    assert plain.n_tokens == strided.n_tokens
    assert abs(plain.perplexity / strided.perplexity - 1) > 100 * PPL_RTOL


def test_eos_prefix_without_bos_token(model):
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), eos_token="</s>", unk_token="<unk>")
    result = perplexity(model, no_bos, TEXTS, window=8, progress=False)
    nll_sum, n_tokens = _oracle(model, no_bos, TEXTS, 7, 7, no_bos.eos_token_id)
    assert result.n_tokens == n_tokens
    assert result.nll_sum == pytest.approx(nll_sum, rel=PPL_RTOL)


def test_batching_and_documents_are_independent(model, tokenizer):
    single = perplexity(model, tokenizer, TEXTS, window=9, stride=4, progress=False)
    batched = perplexity(model, tokenizer, TEXTS, window=9, stride=4, batch_size=5, progress=False)
    per_doc = [perplexity(model, tokenizer, [t], window=9, stride=4, progress=False) for t in TEXTS if t]
    assert batched.nll_sum == pytest.approx(single.nll_sum, rel=PPL_RTOL)
    assert (batched.n_tokens, batched.n_windows) == (single.n_tokens, single.n_windows)
    assert sum(r.nll_sum for r in per_doc) == pytest.approx(single.nll_sum, rel=PPL_RTOL)
    assert sum(r.n_tokens for r in per_doc) == single.n_tokens


def test_a_cache_factory_routes_attention_through_that_cache(model, tokenizer):
    from transformers import DynamicCache

    from hf_plugins import KV4Cache

    plain = perplexity(model, tokenizer, TEXTS, window=9, stride=4, batch_size=3, progress=False)
    made = []

    def dynamic():
        made.append(DynamicCache(config=model.config))
        return made[-1]

    cached = perplexity(model, tokenizer, TEXTS, window=9, stride=4, batch_size=3, progress=False,
                        cache_factory=dynamic)
    assert cached.nll_sum == pytest.approx(plain.nll_sum, rel=PPL_RTOL)
    assert len(made) == -(-plain.n_windows // 3) and made[0].get_seq_length() > 0
    kv4 = perplexity(model, tokenizer, TEXTS, window=9, stride=4, batch_size=3, progress=False,
                     cache_factory=lambda: KV4Cache(model.config, group_size=8))
    assert kv4.nll_sum != pytest.approx(plain.nll_sum, rel=PPL_RTOL)  # the 4-bit keys and values are read


def test_max_chars_truncates_each_document(model, tokenizer):
    truncated = perplexity(model, tokenizer, TEXTS, window=9, max_chars=40, progress=False)
    manual = perplexity(model, tokenizer, [t[:40] for t in TEXTS], window=9, progress=False)
    assert truncated == manual


def test_uniform_logits_give_vocab_size(model, tokenizer):
    uniform = copy.deepcopy(model)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    result = perplexity(uniform, tokenizer, TEXTS, window=9, stride=4, progress=False)
    assert result.perplexity == pytest.approx(VOCAB, rel=PPL_RTOL)


def test_restores_training_mode(model, tokenizer):
    model.train()
    perplexity(model, tokenizer, TEXTS[:1], window=9, progress=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"window": 1}, ValueError, r"window=1 is too small.*window >= 2", id="window-1"),
        pytest.param({"stride": 0}, ValueError, r"stride=0 must be in \[1, 8\]", id="stride-0"),
        pytest.param({"stride": 9}, ValueError, r"stride=9 must be in \[1, 8\].*after the BOS", id="stride-9-bos"),
        pytest.param({"stride": 10, "add_bos": False}, ValueError, r"stride=10 must be in \[1, 9\]", id="stride-10"),
        pytest.param({"max_chars": 0}, ValueError, r"max_chars=0 must be >= 1", id="max-chars-0"),
        pytest.param({"batch_size": 0}, ValueError, r"batch_size=0 must be >= 1", id="batch-0"),
        pytest.param({"texts": []}, ValueError, r"texts is empty", id="texts-empty"),
        pytest.param({"texts": "one document"}, TypeError, r"wrap it as \[text\]", id="texts-str"),
        pytest.param({"texts": ["", "x"], "add_bos": False}, ValueError, r"no token to score", id="nothing-scored"),
    ],
)
def test_bad_arguments(model, tokenizer, kwargs, error, match):
    args = {"texts": TEXTS, "window": 9, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        perplexity(model, tokenizer, args.pop("texts"), **args)


def test_add_bos_needs_a_bos_or_eos_token(model):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), unk_token="<unk>")
    with pytest.raises(ValueError, match=r"neither bos_token_id nor eos_token_id.*add_bos=False"):
        perplexity(model, bare, TEXTS, window=9, progress=False)


@pytest.fixture
def offline(monkeypatch):
    """Set the hub-offline variables and make any network connection attempt fail the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_evaluate_load_from_local_path_offline(offline, model, tokenizer):
    import evaluate

    metric = evaluate.load(PERPLEXITY_METRIC_PATH, keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    scores = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, window=9, stride=4, progress=False)
    direct = perplexity(model, tokenizer, TEXTS, window=9, stride=4, progress=False)
    assert scores == {
        "perplexity": direct.perplexity, "nll_sum": direct.nll_sum,
        "n_tokens": direct.n_tokens, "n_windows": direct.n_windows,
    }


def test_metric_loads_model_id_from_local_folder(offline, model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    metric = load_perplexity_metric()
    scores = metric.compute(predictions=TEXTS, model_id=str(tmp_path), device="cpu", window=9, progress=False)
    direct = perplexity(model, tokenizer, TEXTS, window=9, progress=False)
    assert scores["perplexity"] == pytest.approx(direct.perplexity, rel=PPL_RTOL)
    assert scores["n_tokens"] == direct.n_tokens


def test_metric_rejects_ambiguous_model(offline, model, tokenizer):
    metric = load_perplexity_metric()
    with pytest.raises(ValueError, match="either model= .* or model_id="):
        metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, model_id="x")
    with pytest.raises(ValueError, match="model= needs tokenizer="):
        metric.compute(predictions=TEXTS, model=model)
