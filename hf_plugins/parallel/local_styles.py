"""Tensor-parallel styles for modules that shard themselves: quantized linears with packed buffers, not parameters.

transformers' ``colwise``/``rowwise`` styles wrap *parameters* as DTensors. A packed quantized linear keeps its
integer codes, zeros and scales in buffers, with packing and group constraints only it knows, so these styles ask
the module to keep its own shard (``module.tp_shard("out" | "in", rank, world)``) and run it on plain local
tensors, with the collectives Megatron places around a column/row-parallel pair:

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


class LocalColwise(TensorParallelLayer):
    """Column parallelism for a self-sharding linear: ``[..., in]`` replicated -> ``[..., out / world]`` local
    (or ``[..., out]`` gathered)."""

    def __init__(self, gather_output: bool) -> None:
        self.gather_output = gather_output

    def install_forward(self, module: nn.Module, mesh) -> nn.Module:
        group = mesh.get_group()
        module.tp_shard("out", dist.get_rank(group), dist.get_world_size(group))
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

    def install_forward(self, module: nn.Module, mesh) -> nn.Module:
        group = mesh.get_group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        module.tp_shard("in", rank, world)
        forward = module.forward

        def row_forward(x: torch.Tensor, *args, **kwargs):
            if self.split_input:
                x = x.chunk(world, dim=-1)[rank]
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
