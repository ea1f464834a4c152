"""Compute primitives shared by the model and the kernels (tier 2 of the kernels).

Each op is a ``torch.library.custom_op`` with its autograd formula and fake implementation, a readable
pure-PyTorch reference with the same signature, and the paths the backend switch picks between
(``molm_ds.ops.backend``): the Triton kernels of ``molm_ds.kernels`` (CUDA, or the interpreter), and
the PyTorch fast paths (per-expert ``mm`` loop, block-wise stick-breaking) everywhere else.
"""

from molm_ds.ops.grouped_gemm import (
    GroupCounts, grouped_gemm, grouped_gemm_gated, grouped_gemm_gated_reference, grouped_gemm_reference,
)
from molm_ds.ops.stickbreaking import stickbreaking_attention, stickbreaking_reference

__all__ = [
    "GroupCounts",
    "grouped_gemm",
    "grouped_gemm_gated",
    "grouped_gemm_gated_reference",
    "grouped_gemm_reference",
    "stickbreaking_attention",
    "stickbreaking_reference",
]
