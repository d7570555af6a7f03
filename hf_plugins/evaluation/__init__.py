"""Evaluation: corpus perplexity as a function and as an ``evaluate`` metric shipped with the package.

``import hf_plugins.evaluation`` imports neither transformers nor evaluate; ``load_perplexity_metric`` imports
evaluate when called.
"""

from hf_plugins.evaluation.perplexity import (
    PERPLEXITY_METRIC_PATH,
    PerplexityResult,
    load_perplexity_metric,
    perplexity,
)

__all__ = ["PERPLEXITY_METRIC_PATH", "PerplexityResult", "load_perplexity_metric", "perplexity"]
