"""Compute primitives shared by the model and the kernels.

Each op has a readable pure-PyTorch reference with the same signature as its fast paths (the
block-wise CPU path, `torch._grouped_mm`, and the Triton kernels in `kernels/` on CUDA).
"""

from molm_ds.ops.grouped_gemm import grouped_gemm, grouped_gemm_reference, grouped_mlp, grouped_mlp_reference
from molm_ds.ops.stickbreaking import stickbreaking_attention, stickbreaking_reference

__all__ = [
    "grouped_gemm",
    "grouped_gemm_reference",
    "grouped_mlp",
    "grouped_mlp_reference",
    "stickbreaking_attention",
    "stickbreaking_reference",
]
