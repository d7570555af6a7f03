"""Attention heads under tensor parallelism: whole key/value groups per rank, and per-rank head counts.

Ranks get whole key/value groups (each with its query heads), as evenly as the group count allows: 3 groups on 2
ranks give 2 and 1 (SmolLM2-135M's 9 query / 3 key-value heads), which equal Megatron-style splits cannot do.
Models that ship no TP plan (OPT, Falcon, StableLM ...) reshape with their stored head counts and widths
(``view(b, t, self.num_heads, self.head_dim)``) where TP-ready models use ``-1``; those stored counts are made
the local ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Attribute names that hold a head count or an attention width (never head_dim, which sharding leaves whole).
_COUNT_WORDS = ("head", "embed_dim", "hidden_size", "split_size", "width")


@dataclass(frozen=True)
class HeadLayout:
    """``heads`` query heads in ``kv_heads`` groups (one key/value head each) of ``head_dim`` features."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> HeadLayout:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, kv_heads, int(head_dim))

    def groups_per_rank(self, world_size: int) -> list[int]:
        """Key/value groups each rank holds (balanced, earlier ranks take the extra ones)."""
        base, extra = divmod(self.kv_heads, world_size)
        return [base + (rank < extra) for rank in range(world_size)]

    def projection_range(self, out_features: int, rank: int, world_size: int) -> tuple[int, int]:
        """``[start, stop)`` output features of a head projection (q, k or v; whole groups) held by ``rank``."""
        per_group = out_features // self.kv_heads
        counts = self.groups_per_rank(world_size)
        start = sum(counts[:rank]) * per_group
        return start, start + counts[rank] * per_group

    def local_counts(self, rank: int, world_size: int) -> dict[int, int]:
        """Full head count or width -> the one ``rank`` holds."""
        groups = self.groups_per_rank(world_size)[rank]
        queries = groups * (self.heads // self.kv_heads)
        return {
            self.heads: queries,
            self.kv_heads: groups,
            self.heads * self.head_dim: queries * self.head_dim,
            self.kv_heads * self.head_dim: groups * self.head_dim,
        }


def has_native_tp_plan(model: nn.Module) -> bool:
    """Whether transformers ships a TP plan for this architecture (its attention then reshapes with ``-1``)."""
    return bool(getattr(type(model), "_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None))


def attention_modules(model: nn.Module, head_linears: set[str]) -> list[nn.Module]:
    """The parents of the column-parallel head projections (one attention module per layer)."""
    parents = {name.rpartition(".")[0] for name in head_linears}
    return [model.get_submodule(name) for name in sorted(parents)]


def localize_head_counts(modules: list[nn.Module], local: dict[int, int]) -> list[str]:
    """Replace every int attribute of ``modules`` that names a head count or attention width and holds a key of
    ``local`` by its value; returns ``Class.attr`` strings of what changed (for logs and errors)."""
    changed = []
    for module in modules:
        for attr, value in list(vars(module).items()):
            if type(value) is not int or value not in local or "head_dim" in attr:
                continue
            if any(word in attr for word in _COUNT_WORDS):
                setattr(module, attr, local[value])
                changed.append(f"{type(module).__name__}.{attr}")
    return changed
