"""Tensor-parallel styles on plain local tensors: self-sharding quantized linears and uneven feature ranges.

transformers' ``colwise``/``rowwise`` styles wrap *parameters* as evenly sharded DTensors. Two cases need more:
a packed quantized linear keeps its integer codes, zeros and scales in buffers, with packing and group
constraints only it knows (it keeps its own shard: ``module.tp_shard("out" | "in", start, stop)``); and ranks
holding uneven whole head groups need explicit ranges (``module.tp_feature_range``, else an even split). These
styles slice the module and run it locally, with the collectives Megatron places around a column/row pair:

- column: input replicated (gradient all-reduced in backward); output the local feature shard, or all-gathered;
- row: input the local feature shard (or split locally from a replicated one); partial outputs all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from transformers.distributed.parallel_utils import _AllReduceBackward, _AllReduceForward
from transformers.distributed.tensor_parallel import TensorParallelLayer

# The style a self-sharding module gets in place of transformers' parameter-sharding one.
LOCAL_STYLE_NAMES = {
    "colwise": "local_colwise",
    "colwise_gather_output": "local_colwise_gather_output",
    "rowwise": "local_rowwise",
    "rowwise_split_input": "local_rowwise_split_input",
}


def shards_itself(module: nn.Module) -> bool:
    """Whether ``module`` keeps its own tensor-parallel shard (``tp_shard``), like our AWQ linears."""
    return callable(getattr(module, "tp_shard", None))


def _feature_range(module: nn.Module, features: str, rank: int, world: int) -> tuple[int, int]:
    """The module's assigned ``tp_feature_range``, else this rank's even share of its features."""
    assigned = getattr(module, "tp_feature_range", None)
    if assigned is not None:
        return assigned
    full = module.out_features if features == "out" else module.in_features
    if full % world:
        raise ValueError(f"{features}_features={full} does not split into {world} equal tensor-parallel shards.")
    local = full // world
    return rank * local, (rank + 1) * local


def _keep_features(module: nn.Module, features: str, start: int, stop: int) -> None:
    """Slice ``module`` to output (``"out"``) or input (``"in"``) features ``[start, stop)``; an input slice keeps
    the bias only where it starts at 0 (partial sums are added up across ranks)."""
    if shards_itself(module):
        module.tp_shard(features, start, stop)
        return
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"local tensor-parallel styles shard nn.Linear or modules with tp_shard, not {type(module).__name__}."
        )
    weight, bias = module.weight.detach(), module.bias
    if features == "out":
        module.weight = nn.Parameter(weight[start:stop].clone(), requires_grad=module.weight.requires_grad)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach()[start:stop].clone(), requires_grad=bias.requires_grad)
        module.out_features = stop - start
    else:
        module.weight = nn.Parameter(weight[:, start:stop].clone(), requires_grad=module.weight.requires_grad)
        if bias is not None and start != 0:
            module.bias = None
        module.in_features = stop - start


class LocalColwise(TensorParallelLayer):
    """Column parallelism for a self-sharding linear: ``[..., in]`` replicated -> ``[..., out / world]`` local
    (or ``[..., out]`` gathered)."""

    def __init__(self, gather_output: bool) -> None:
        self.gather_output = gather_output

    def install_forward(self, module: nn.Module, mesh, *, config=None, mesh_manager=None) -> nn.Module:
        group = mesh.get_group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        _keep_features(module, "out", *_feature_range(module, "out", rank, world))
        forward = module.forward

        def column_forward(x: torch.Tensor, *args, **kwargs):
            if torch.is_grad_enabled() and x.requires_grad:
                x = _AllReduceBackward.apply(x, group)
            out = forward(x, *args, **kwargs)
            if self.gather_output:
                out = funcol.all_gather_single_autograd(out.movedim(-1, 0).contiguous(), 0, group).movedim(0, -1)
            return out

        module.forward = column_forward
        return module


class LocalRowwise(TensorParallelLayer):
    """Row parallelism for a self-sharding linear: ``[..., in / world]`` local (or ``[..., in]`` replicated, split
    here) -> ``[..., out]`` replicated after an all-reduce of the partial sums."""

    def __init__(self, split_input: bool) -> None:
        self.split_input = split_input

    def install_forward(self, module: nn.Module, mesh, *, config=None, mesh_manager=None) -> nn.Module:
        group = mesh.get_group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        start, stop = _feature_range(module, "in", rank, world)
        _keep_features(module, "in", start, stop)
        forward = module.forward

        def row_forward(x: torch.Tensor, *args, **kwargs):
            if self.split_input:
                x = x[..., start:stop]
            return _AllReduceForward.apply(forward(x, *args, **kwargs), group)

        module.forward = row_forward
        return module


def local_styles() -> dict[str, TensorParallelLayer]:
    """The styles to register in transformers' ``ALL_PARALLEL_STYLES``, by name."""
    return {
        "local_colwise": LocalColwise(gather_output=False),
        "local_colwise_gather_output": LocalColwise(gather_output=True),
        "local_rowwise": LocalRowwise(split_input=False),
        "local_rowwise_split_input": LocalRowwise(split_input=True),
    }
