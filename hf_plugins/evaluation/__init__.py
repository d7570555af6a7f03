"""Evaluation: corpus perplexity and speculative-decoding metrics, as functions and as ``evaluate`` metrics shipped
with the package.

``import hf_plugins.evaluation`` imports neither transformers nor evaluate; the ``load_*_metric`` functions import
evaluate when called.
"""

from hf_plugins.evaluation.perplexity import (
    PERPLEXITY_METRIC_PATH,
    PerplexityResult,
    load_perplexity_metric,
    perplexity,
)

from hf_plugins.evaluation.speculative import (
    SPECULATIVE_METRIC_PATH,
    load_speculative_metric,
    speculative_fields,
    summarize_speculative,
)

__all__ = [
    "PERPLEXITY_METRIC_PATH",
    "SPECULATIVE_METRIC_PATH",
    "PerplexityResult",
    "load_perplexity_metric",
    "load_speculative_metric",
    "perplexity",
    "speculative_fields",
    "summarize_speculative",
]
