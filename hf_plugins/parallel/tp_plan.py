"""Automatic tensor-parallel plans (Redco-style rules) derived from a causal LM's traced dataflow.

Rules, applied in call order over one real forward (see ``dataflow.py``):

- a linear whose input is replicated (derives from no sharded linear) is column-parallel: ``colwise``;
- a linear whose input derives from column-parallel outputs is row-parallel: ``rowwise`` (its all-reduce makes
  the stream replicated again);
- a column-parallel linear whose output never reaches a row-parallel one (a router, a gate read by top-k) stays
  replicated, and the trace is redone without it;
- the LM head is vocabulary-parallel with gathered logits (``colwise_gather_output``) and the input embeddings are
  vocabulary-parallel (``embedding_rowwise``), as in transformers' hand-written plans;
- linears whose outputs meet in attention products hold heads: each rank must get whole key/value groups with
  their query heads, else a ``ValueError`` names the layer, its head counts and the world sizes that work;
- a fused projection whose output is cut into parts (q|k|v, gate|up), or whose whole output is normalised at
  once (OLMo-2's q/k norms), has its output gathered (``colwise_gather_output``), with every linear sharing its
  row-parallel consumer; that consumer splits its input locally (``rowwise_split_input``). This is exact for any
  part sizes, as transformers' Phi-3 and OLMo-2 plans do;
- several norms on one projection's output (a per-head norm list) also gather it, since they are picked by
  position;
- norms inside a sharded span (Qwen3's per-head q/k norms) stay replicated with their gradients all-reduced
  (``replicated_with_grad_allreduce``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from .dataflow import LinearFlow, trace_linear_flow
from .head_counts import HeadLayout

# ``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``: transformers' plan key form.
_wildcard = replace_layer_number_by_wildcard


def example_inputs(model: nn.Module) -> dict:
    """A short unpadded prompt on the model's device: enough to exercise every layer once."""
    config = model.config.get_text_config()
    device = next(model.parameters()).device
    ids = torch.arange(8, device=device)[None] % max(2, config.vocab_size)
    return {"input_ids": ids, "use_cache": False}


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def derive_flow(model: nn.Module) -> tuple[LinearFlow, frozenset[str]]:
    """Trace ``model`` until no column-parallel linear is left without a row-parallel consumer.

    Returns the final flow and the linears kept replicated.
    """
    head = _name_of(model, model.get_output_embeddings())
    replicated: frozenset[str] = frozenset()
    was_training = model.training
    model.eval()
    try:
        while True:
            flow = trace_linear_flow(model, example_inputs(model), replicated)
            consumed = frozenset().union(*flow.sources.values()) if flow.sources else frozenset()
            dangling = {
                name for name in flow.order
                if name not in replicated and not flow.sources[name] and name not in consumed and name != head
            }
            if not dangling:
                return flow, replicated
            replicated |= dangling
    finally:
        model.train(was_training)


def auto_tp_plan(model: nn.Module, world_size: int | None = None) -> dict[str, str]:
    """Derive a tensor-parallel plan for ``model`` in transformers' format (``{"model.layers.*.mlp.up_proj":
    "colwise", ...}``), usable as ``DistributedConfig(tp_plan=...)`` or by :func:`tensor_parallel`.

    Args:
        model: a causal LM (any architecture whose linear layers are ``nn.Linear`` or expose
            ``in_features``/``out_features``, e.g. our quantized linears).
        world_size: when given, check that attention heads split evenly over this many ranks (what DTensor
            sharding through ``DistributedConfig`` needs; :func:`tensor_parallel` also splits key/value groups
            unevenly).

    Raises:
        ValueError: the heads of a column-parallel projection do not split evenly over ``world_size`` ranks.
    """
    flow, replicated = derive_flow(model)
    return plan_from_flow(model, flow, replicated, world_size)


def plan_from_flow(
    model: nn.Module, flow: LinearFlow, replicated: frozenset[str], world_size: int | None
) -> dict[str, str]:
    """The plan the rules give for a traced ``flow`` (see :func:`auto_tp_plan`)."""
    head = _name_of(model, model.get_output_embeddings())
    embeddings = model.get_input_embeddings()
    gathered = gathered_linears(flow, replicated)
    styles: dict[str, str] = {}
    if isinstance(embeddings, nn.Embedding):
        styles[_name_of(model, embeddings)] = "embedding_rowwise"
    for name in flow.order:
        if name in replicated:
            continue
        if name == head or name in gathered:
            styles[name] = "colwise_gather_output"
        elif not flow.sources[name]:
            styles[name] = "colwise"
        elif flow.sources[name] & gathered:
            styles[name] = "rowwise_split_input"
        else:
            styles[name] = "rowwise"
    # Norms inside a sharded span (per-head q/k norms) see only local heads: their weight gradients are partial.
    for norm, sources in flow.norm_inputs.items():
        if not sources & gathered:
            styles[norm] = "replicated_with_grad_allreduce"
    if world_size is not None:
        check_heads_divide(model, flow, styles, world_size)
    return _generalise(styles)


def gathered_linears(flow: LinearFlow, replicated: frozenset[str]) -> frozenset[str]:
    """Column-parallel linears whose output must be gathered whole, and everything sharing a consumer with them.

    A fused projection cut into parts, or one whose whole output width is normalised at once (OLMo-2's q/k norms),
    cannot be used sharded. Its row-parallel consumer then takes a replicated input, so every other linear feeding
    that consumer (v next to q and k) must be gathered as well.
    """
    column = {name for name in flow.order if name not in replicated and not flow.sources[name]}
    gathered = set(flow.split) & column
    norms_per_linear: dict[str, int] = {}
    for norm, sources in flow.norm_inputs.items():
        for linear in sources:
            norms_per_linear[linear] = norms_per_linear.get(linear, 0) + 1
            if flow.out_features.get(linear) == flow.norm_widths[norm]:
                gathered.add(linear)
    # Several norms on one projection's output are per-slice norms (StableLM's per-head LayerNorm list), picked by
    # position: a rank holding heads 2-3 would apply the norms of heads 0-1.
    gathered |= {linear for linear, count in norms_per_linear.items() if count > 1}
    gathered &= column
    changed = True
    while changed:
        changed = False
        for name in flow.order:
            sources = flow.sources[name]
            if sources & gathered and not sources <= gathered:
                gathered |= sources
                changed = True
    return frozenset(gathered)


def check_heads_divide(
    model: nn.Module, flow: LinearFlow, styles: dict[str, str], world_size: int, allow_uneven: bool = False
) -> None:
    """ValueError unless every column-parallel head projection can give each rank whole heads.

    Even splits always work; with ``allow_uneven`` (our :func:`tensor_parallel`), so does any world size up to the
    number of key/value groups.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    layout = HeadLayout.of(model)
    counts = f"num_attention_heads={layout.heads}, num_key_value_heads={layout.kv_heads}"
    for name in flow.order:
        if styles.get(name) != "colwise" or name not in flow.heads:
            continue
        heads = flow.out_features[name] // layout.head_dim
        if heads % world_size == 0:
            continue
        if layout.kv_heads < world_size:
            raise ValueError(
                f"Tensor parallelism gives each rank whole key/value head groups, but {name} has {heads} heads in "
                f"{layout.kv_heads} group(s) ({counts}) and the world size is {world_size}. Use a tensor-parallel "
                f"size of at most {layout.kv_heads}."
            )
        if not allow_uneven:
            works = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ValueError(
                f"{name} has {heads} heads ({counts}), which do not split evenly over {world_size} ranks as "
                f"transformers' DTensor sharding needs. Use hf_plugins.parallel.tensor_parallel(model), which gives "
                f"ranks whole key/value groups unevenly, or a tensor-parallel size dividing {heads}: {works}."
            )


def plan_styles(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """``{module name: style}`` for every module a (wildcard) plan names."""
    patterns = {key: re.compile(re.escape(key).replace(r"\*", r"\d+")) for key in plan}
    return {
        name: plan[key] for name, _ in model.named_modules() for key, pattern in patterns.items()
        if pattern.fullmatch(name)
    }


def _generalise(styles: dict[str, str]) -> dict[str, str]:
    """Replace layer indices by ``*`` where every layer agrees on the style; keep exact names otherwise."""
    by_pattern: dict[str, set[str]] = {}
    for name, style in styles.items():
        by_pattern.setdefault(_wildcard(name), set()).add(style)
    plan = {}
    for name, style in styles.items():
        pattern = _wildcard(name)
        plan[pattern if len(by_pattern[pattern]) == 1 else name] = style
    return plan

