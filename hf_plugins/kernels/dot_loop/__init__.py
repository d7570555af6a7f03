"""A tensor-core throughput probe: each program multiplies one register-resident tile pair ``iters`` times.

Not an operator of any model: ``hf-plugins bench hw`` times it to measure what a Triton ``tl.dot`` loop reaches on
this GPU (no memory traffic inside the loop), beside cuBLAS. The reference gives the exact result to check it by.
"""

from .reference import dot_loop_reference
from .triton import dot_loop_triton

__all__ = ["dot_loop_reference", "dot_loop_triton"]
