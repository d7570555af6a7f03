"""Speculative-decoding metrics over many ``generate`` calls, as a function and as an ``evaluate`` metric.

    >>> metric = load_speculative_metric()
    >>> out = model.generate(**inputs, assistant_model=draft, return_dict_in_generate=True)
    >>> metric.add(**speculative_fields(out.speculative_stats))
    >>> metric.compute()
    {'acceptance_rate': ..., 'tokens_per_target_forward': ..., 'draft_fraction': ..., 'runs': ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

SPECULATIVE_METRIC_PATH = str(Path(__file__).with_name("speculative_metric.py"))
"""Path of the ``evaluate`` metric script: ``evaluate.load(SPECULATIVE_METRIC_PATH)`` needs no hub."""

COUNT_FIELDS = ("drafted", "accepted", "emitted", "rows", "target_forwards", "row_forwards")
TIME_FIELDS = ("draft_seconds", "verify_seconds", "total_seconds")


def speculative_fields(stats: Mapping) -> dict:
    """The metric's input columns from one ``out.speculative_stats`` dict."""
    missing = [name for name in COUNT_FIELDS + TIME_FIELDS if name not in stats]
    if missing:
        raise ValueError(f"speculative stats lack {missing}; pass out.speculative_stats of a speculative generate.")
    return {name: stats[name] for name in COUNT_FIELDS + TIME_FIELDS}


def summarize_speculative(runs: Iterable[Mapping]) -> dict:
    """Pool several runs' counters: token-weighted acceptance, tokens per target forward, share of time drafting."""
    runs = [speculative_fields(run) for run in runs]
    if not runs:
        raise ValueError("nothing to compute: add the speculative_stats of at least one generate call first.")
    total = {name: sum(run[name] for run in runs) for name in COUNT_FIELDS + TIME_FIELDS}
    row_forwards = total["row_forwards"]
    return {
        "acceptance_rate": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
        "tokens_per_target_forward": total["emitted"] / row_forwards if row_forwards else 0.0,
        "draft_fraction": total["draft_seconds"] / total["total_seconds"] if total["total_seconds"] else 0.0,
        "runs": len(runs),
    }


def load_speculative_metric(*, keep_in_memory: bool = True, **load_kwargs):
    """``evaluate.load`` of the shipped speculative metric script, from its local path (no hub access)."""
    import evaluate  # seconds of import time (datasets, pyarrow): only when asked for

    return evaluate.load(SPECULATIVE_METRIC_PATH, keep_in_memory=keep_in_memory, **load_kwargs)
