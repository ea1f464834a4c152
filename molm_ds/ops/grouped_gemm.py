"""Grouped expert GEMM on rows that are already grouped by expert.

Legend: N = rows (token-expert pairs), E = experts, I = input width, O = output width.
`x_NI` holds the rows of expert 0 first, then expert 1, ...; `counts_E[e]` rows belong to expert e.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_gemm_reference(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """Readable loop: y[rows of e] = x[rows of e] @ w[e]."""
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"grouped_gemm: x {tuple(x_NI.shape)} and w {tuple(w_EIO.shape)} do not fit")
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        outs.append(x_NI[start : start + n] @ w_EIO[e])
        start += n
    if start != x_NI.shape[0]:
        raise ValueError(f"grouped_gemm: counts sum to {start} but x has {x_NI.shape[0]} rows")
    if not outs:
        return x_NI.new_zeros(0, w_EIO.shape[2])
    return torch.cat(outs, dim=0)


def grouped_gemm(x_NI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """Grouped GEMM; same contract as `grouped_gemm_reference` (fast paths are added by the kernels work)."""
    return grouped_gemm_reference(x_NI, w_EIO, counts_E)
