"""Shard a loaded model over a device mesh with a tensor-parallel plan (ours by default), through DTensor.

The plan is applied with transformers' own machinery (``apply_tensor_parallelism`` and the styles registered in
``ALL_PARALLEL_STYLES``), so a model sharded here behaves exactly like one loaded with
``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N, tp_plan=plan))``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import apply_tensor_parallelism

from .._compat import shard_param
from .local_styles import LOCAL_STYLE_NAMES, shards_itself
from .head_counts import HeadLayout, attention_modules, has_native_tp_plan, localize_head_counts
from .tp_plan import check_heads_divide, derive_flow, example_inputs, plan_from_flow, plan_styles

# Largest relative logit difference the post-sharding check accepts: rounding from a different reduction order,
# far below what a wrong shard gives (order 1).
_VERIFY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def tensor_parallel(
    model: nn.Module, mesh: DeviceMesh | None = None, plan: dict[str, str] | None = None, verify: bool = True
) -> nn.Module:
    """Shard ``model`` in place across the ranks of ``mesh`` and return it.

    Every rank must hold the same full weights (e.g. all loaded the same checkpoint); each keeps its shard. Models
    whose architecture has no transformers TP plan get their attention modules' stored head counts made local.

    Args:
        model: a transformers model (a ``PreTrainedModel``).
        mesh: a 1-D ``DeviceMesh``; default: every rank of the initialised default process group, on the
            model's device type.
        plan: ``{module or parameter pattern: style}`` in transformers' format; default
            :func:`~hf_plugins.parallel.auto_tp_plan` derived from the model (checked against the mesh size).
        verify: run a short prompt before and after sharding and raise if the logits differ (a plan that does
            not fit the model's code); costs two small forwards.

    Raises:
        ValueError: no process group is initialised, the mesh is not 1-D, the plan does not fit the model, or the
            sharded model's logits differ from the unsharded ones.
    """
    if mesh is None:
        if not dist.is_initialized():
            raise ValueError(
                "tensor_parallel needs torch.distributed: launch with `accelerate launch` (or torchrun) and create "
                "the process group first (e.g. `Accelerator()`), or pass a DeviceMesh."
            )
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    if mesh.ndim != 1:
        raise ValueError(f"tensor_parallel takes a 1-D mesh (the TP dimension); got {mesh.ndim} dimensions.")
    world, rank = mesh.size(), mesh.get_local_rank()
    native = has_native_tp_plan(model)
    flow, replicated = derive_flow(model)
    plan = plan_from_flow(model, flow, replicated, None) if plan is None else dict(plan)
    check_heads_divide(model, flow, plan_styles(model, plan), world, allow_uneven=True)
    example = example_inputs(model)
    reference = _logits(model, example) if verify else None

    model.tp_plan = plan  # transformers validates the style names
    expanded = model._expand_parallel_plan(plan)
    layout = HeadLayout.of(model)
    head_linears = {name for name in flow.heads if expanded.get(name) == "colwise"}
    uneven = any((flow.out_features[name] // layout.head_dim) % world for name in head_linears)
    if uneven:
        _assign_head_group_ranges(model, flow, expanded, layout, rank, world)
    expanded = _with_local_styles(model, expanded, all_linears=uneven)
    aliases = _tied_aliases(model)
    apply_tensor_parallelism(model, mesh, {name: style for name, style in expanded.items() if name not in aliases})
    for alias, owner in aliases.items():
        if alias in expanded:
            _shard_tied(model, alias, owner, ALL_PARALLEL_STYLES[expanded[alias]], mesh)
    localized = []
    if not native:
        localized = localize_head_counts(attention_modules(model, head_linears), layout.local_counts(rank, world))
    model._device_mesh = mesh
    model._tp_size = world
    if verify:
        _check_same_logits(model, example, reference, localized)
    return model


def _assign_head_group_ranges(model: nn.Module, flow, expanded: dict[str, str], layout: HeadLayout, rank: int,
                              world: int) -> None:
    """Give every column/row-parallel linear the ``[start, stop)`` feature range this rank keeps
    (``tp_feature_range``): head projections whole key/value groups, other columns an even split, and each row
    linear the range of the column linear whose output it reads."""
    modules = dict(model.named_modules())
    for name in flow.order:
        if expanded.get(name) != "colwise":
            continue
        out = flow.out_features[name]
        if name in flow.heads:
            modules[name].tp_feature_range = layout.projection_range(out, rank, world)
        else:
            base, extra = divmod(out, world)
            start = rank * base + min(rank, extra)
            modules[name].tp_feature_range = (start, start + base + (rank < extra))
    for name in flow.order:
        if expanded.get(name) != "rowwise":
            continue
        width = flow.in_features[name]
        source = next(s for s in sorted(flow.sources[name]) if flow.out_features[s] == width)
        modules[name].tp_feature_range = modules[source].tp_feature_range


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs).logits.float()
    finally:
        model.train(was_training)


def _check_same_logits(model: nn.Module, inputs: dict, reference: torch.Tensor, localized: list[str]) -> None:
    """ValueError unless the sharded model reproduces ``reference`` (up to reduction-order rounding)."""
    hint = (
        "Its attention code likely hard-codes head counts or widths that sharding changes"
        + (f" (made local: {sorted(set(localized))})" if localized else "")
        + "; pass a hand-written plan=... or verify=False if you know better."
    )
    try:
        logits = _logits(model, inputs)
    except RuntimeError as error:
        name = type(model).__name__
        raise ValueError(f"The tensor-parallel {name} fails on a test prompt: {error}. {hint}") from error
    # Packed quantized kernels may compute in bf16 whatever the parameters' dtype (the CPU int4 kernel does).
    quantized = any(shards_itself(module) for module in model.modules())
    dtype = torch.bfloat16 if quantized else next(model.parameters()).dtype
    tolerance = _VERIFY_RTOL.get(dtype, 5e-2)
    error = ((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
    if not error <= tolerance:
        raise ValueError(
            f"The tensor-parallel {type(model).__name__} gives logits {error:.2e} (relative) away from the unsharded "
            f"model's (allowed {tolerance:.0e}). {hint}"
        )


def _with_local_styles(model: nn.Module, expanded: dict[str, str], all_linears: bool) -> dict[str, str]:
    """Self-sharding modules (our quantized linears), and every column/row linear when ranks hold uneven head
    groups (which DTensor's even shards cannot express), take the ``local_*`` variant of their style; the
    parameter entries of the latter are dropped (the module slices its own)."""
    modules = dict(model.named_modules())
    out = dict(expanded)
    for name, style in expanded.items():
        module = modules.get(name)
        if style not in LOCAL_STYLE_NAMES or module is None:
            continue
        if shards_itself(module) or (all_linears and style in ("colwise", "rowwise")):
            out[name] = LOCAL_STYLE_NAMES[style]
            for param_name, _ in module.named_parameters(recurse=False):
                out.pop(f"{name}.{param_name}", None)
    return out


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: owner}`` for parameters reachable under two names (tied embeddings: ``lm_head.weight``)."""
    owners = {id(param): name for name, param in model.named_parameters()}
    return {
        name: owners[id(param)]
        for name, param in model.named_parameters(remove_duplicate=False)
        if owners[id(param)] != name
    }


def _shard_tied(model: nn.Module, alias: str, owner: str, style, mesh: DeviceMesh) -> None:
    """Shard a tied alias with its own style, then tie it back to the owner when both landed on the same placement
    (vocabulary-parallel embedding and head both shard the vocabulary rows); otherwise they stay separate."""
    module_name, _, param_name = alias.rpartition(".")
    module = model.get_submodule(module_name)
    shard_param(style, module, param_name, mesh, model)
    sharded, shared = module._parameters[param_name], model.get_parameter(owner)
    if isinstance(sharded, DTensor) and isinstance(shared, DTensor) and sharded.placements == shared.placements:
        module._parameters[param_name] = shared
