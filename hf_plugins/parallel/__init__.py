"""Tensor, pipeline and sequence parallelism on torch.distributed, launched through Accelerate."""

from .pipeline import Pipeline, build_pipeline, stage_ranges
from .sequence import SequenceShard, shard_for_group, sharded_next_token_loss, zigzag_shard
from .tensor_parallel import tensor_parallel
from .tp_plan import auto_tp_plan

__all__ = [
    "Pipeline",
    "SequenceShard",
    "auto_tp_plan",
    "build_pipeline",
    "shard_for_group",
    "sharded_next_token_loss",
    "stage_ranges",
    "tensor_parallel",
    "zigzag_shard",
]
