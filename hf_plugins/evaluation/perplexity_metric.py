"""The ``evaluate`` metric script of hf_plugins' corpus perplexity, loaded from its local path (no hub).

    >>> import evaluate
    >>> from hf_plugins.evaluation import PERPLEXITY_METRIC_PATH
    >>> metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    >>> metric.compute(predictions=texts, model=model, tokenizer=tokenizer, window=512, max_chars=6000)
    {'perplexity': ..., 'nll_sum': ..., 'n_tokens': ..., 'n_windows': ...}

evaluate copies this file into its modules cache (``HF_MODULES_CACHE``) and imports the copy, so the imports are
absolute: a relative import would make evaluate copy ``perplexity.py`` beside it as a second, separate module.
hf_plugins must therefore be importable (installed, or on ``sys.path``). evaluate instantiates the first
``EvaluationModule`` subclass in this module's namespace, so ``evaluate.Metric`` is referred to through its module
rather than imported by name (the imported base class would be found first).
"""

import dataclasses

import datasets
import evaluate

from hf_plugins.evaluation.perplexity import perplexity

_DESCRIPTION = """Corpus perplexity of a causal language model over sliding windows: exp of the mean negative
log-likelihood per scored token, each token scored at most once, BOS prepended to every window by default.
Unlike the hub's `perplexity` metric it returns one corpus-level (token-weighted) value, not one per text."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): the documents; each is windowed on its own.
    model (PreTrainedModel, Optional): a loaded causal LM; give it with `tokenizer`, or give `model_id` instead.
    tokenizer (PreTrainedTokenizerBase, Optional): the tokenizer of `model` (with `model_id`: loaded from it).
    model_id (str, Optional): a local model folder (or hub id where the hub is reachable) to load.
    device (str, Optional): device for the model loaded from `model_id`. Default: cuda when available, else cpu.
    dtype (str or torch.dtype, Optional): dtype for the model loaded from `model_id`. Default: "auto".
    window, stride, max_chars, add_bos, batch_size, progress: as `hf_plugins.evaluation.perplexity`.
Returns:
    perplexity (float), nll_sum (float, nats), n_tokens (int, scored tokens), n_windows (int).
"""


def _load_model(model_id, tokenizer, device, dtype):
    """Model and tokenizer from ``model_id`` (a local folder never touches the network)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device)
    return model, tokenizer or AutoTokenizer.from_pretrained(model_id)


class HfPluginsPerplexity(evaluate.Metric):
    """Corpus perplexity over sliding windows; ``compute`` calls ``hf_plugins.evaluation.perplexity``."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model=None, tokenizer=None, model_id=None, device=None, dtype="auto", **kwargs):
        if (model is None) == (model_id is None):
            raise ValueError("pass either model= (with tokenizer=) or model_id=, not both and not neither.")
        if model_id is not None:
            model, tokenizer = _load_model(model_id, tokenizer, device, dtype)
        elif tokenizer is None:
            raise ValueError("model= needs tokenizer= too.")
        return dataclasses.asdict(perplexity(model, tokenizer, predictions, **kwargs))
