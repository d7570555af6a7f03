"""Tensor, pipeline and sequence parallelism on torch.distributed, launched through Accelerate."""

from .tensor_parallel import tensor_parallel
from .tp_plan import auto_tp_plan

__all__ = ["auto_tp_plan", "tensor_parallel"]
