"""Per-rank head counts for attention modules written without tensor parallelism in mind.

Models that ship no TP plan (OPT, Falcon, StableLM ...) reshape with their stored head counts and widths
(``view(b, t, self.num_heads, self.head_dim)``), where TP-ready models use ``-1``. After column-parallel sharding
each rank holds ``1/world`` of the heads, so those stored counts must be the local ones.
"""

from __future__ import annotations

from torch import nn

# Attribute names that hold a head count or an attention width (never head_dim, which sharding leaves whole).
_COUNT_WORDS = ("head", "embed_dim", "hidden_size", "split_size", "width")


def has_native_tp_plan(model: nn.Module) -> bool:
    """Whether transformers ships a TP plan for this architecture (its attention then reshapes with ``-1``)."""
    return bool(getattr(type(model), "_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None))


def attention_modules(model: nn.Module, head_linears: set[str]) -> list[nn.Module]:
    """The parents of the column-parallel head projections (one attention module per layer)."""
    parents = {name.rpartition(".")[0] for name in head_linears}
    return [model.get_submodule(name) for name in sorted(parents)]


def localize_head_counts(modules: list[nn.Module], full_counts: set[int], world_size: int) -> list[str]:
    """Divide by ``world_size`` every int attribute of ``modules`` that names a head count or attention width and
    holds one of ``full_counts``; returns ``module.attr`` strings of what changed (for logs and errors)."""
    changed = []
    for module in modules:
        for attr, value in list(vars(module).items()):
            if type(value) is not int or value not in full_counts or "head_dim" in attr:
                continue
            if any(word in attr for word in _COUNT_WORDS):
                setattr(module, attr, value // world_size)
                changed.append(f"{type(module).__name__}.{attr}")
    return changed
