"""Stick-breaking attention: Triton kernels and launchers (``launch``; imports Triton).

This module holds only what must import without Triton: the block sizes (the ops' fake
implementations need them to give the forward's stop table its shape).
The autograd formula and the ``torch.library`` ops are in ``molm_ds.ops.stickbreaking``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Blocks", "blocks_for"]


@dataclass(frozen=True)
class Blocks:
    """BM queries x BN keys per tile; the head dim is contracted BD at a time and the output is split
    into BDV-wide slices, one program each (large heads: MoLM's is 1024 wide)."""

    BM: int
    BN: int
    BD: int
    BDV: int
    num_warps: int
    num_stages: int


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def blocks_for(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> Blocks:
    """Block sizes for a head dim and dtype. Off the GPU (the interpreter) small tiles, so that test
    shapes span several tiles. On the GPU starting points, not yet tuned on one (docs/benchmarks.md)."""
    d = max(16, _p2(head_dim))
    if not on_gpu:
        return Blocks(BM=16, BN=16, BD=min(d, 32), BDV=min(d, 32), num_warps=1, num_stages=1)
    if d <= 64:
        return Blocks(BM=64, BN=64, BD=d, BDV=d, num_warps=4, num_stages=2)
    if d <= 128:
        return Blocks(BM=64, BN=32, BD=d, BDV=d, num_warps=4, num_stages=2)
    # wide heads (MoLM: 1024): logits contracted 64 at a time, the output split in 256-wide slices, 32-row
    # tiles so that the dQ pass's two [BM, BDV] fp32 accumulators stay in registers
    return Blocks(BM=32, BN=32, BD=64, BDV=min(d, 256), num_warps=8, num_stages=2)
