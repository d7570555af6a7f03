"""The ``evaluate`` metric script of hf_plugins' speculative-decoding metrics, loaded from its local path.

Absolute imports and ``evaluate.Metric`` through its module, for the reasons given in ``perplexity_metric.py``.
"""

import datasets
import evaluate

from hf_plugins.evaluation.speculative import COUNT_FIELDS, TIME_FIELDS, summarize_speculative

_DESCRIPTION = """Acceptance rate, mean tokens per target forward and share of time spent drafting, pooled over
speculative generate calls (add one call's `speculative_fields(out.speculative_stats)` per row)."""

_KWARGS_DESCRIPTION = """
Args (columns, one entry per generate call):
    drafted, accepted, emitted, rows, target_forwards (int), draft_seconds, verify_seconds, total_seconds (float).
Returns:
    acceptance_rate (float), tokens_per_target_forward (float), draft_fraction (float), runs (int).
"""


class HfPluginsSpeculative(evaluate.Metric):
    """Pooled speculative-decoding counters; ``compute`` calls ``summarize_speculative``."""

    def _info(self):
        features = {name: datasets.Value("int64") for name in COUNT_FIELDS}
        features.update({name: datasets.Value("float64") for name in TIME_FIELDS})
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, **columns):
        names = list(columns)
        runs = [dict(zip(names, values)) for values in zip(*columns.values())]
        return summarize_speculative(runs)
