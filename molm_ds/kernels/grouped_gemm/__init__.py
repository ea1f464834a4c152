"""Scattered grouped expert GEMM: Triton kernels and launchers (``launch``; imports Triton).

Rows are grouped by expert (all rows of expert 0, then expert 1, ...); row p may read its input from a
gathered row and write its output to a scattered row, so the gather before and the scatter after the
expert GEMM cost no extra pass over memory. The autograd formulas and the ``torch.library`` ops are
in ``molm_ds.ops.grouped_gemm``.
"""
