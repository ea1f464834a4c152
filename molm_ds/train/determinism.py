"""``training.deterministic: true``: the same job run twice gives bit-identical losses, gradients and checkpoints.

What it switches on, for the duration of ``train`` (the previous settings come back afterwards):

- ``torch.use_deterministic_algorithms(True)``: every PyTorch op of the step must have a deterministic
  implementation (on CUDA, ops that only have an atomic one raise instead of running), cuDNN in
  deterministic mode without autotuning, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS needs it for
  reproducible GEMMs; set before the first CUDA call, so before the process group);
- the MoE path's reductions over a token's k slots become sorted, atomic-free ones (scatter to distinct slot
  rows, then a sum over k in slot order: ``molm_ds.model.dispatch``), and the fused PyTorch gather/combine
  GEMM path (which scatters with ``index_add_``) is bypassed; the Triton kernels and the stick-breaking
  backward have no atomics and run unchanged.

Already deterministic in every mode: the data order (a function of ``training.seed`` and the global sample
counter; each data-parallel rank reads its own slice), the RNG streams of dropout and sampled routing
(seeded with ``training.seed + 1 + rank``, saved and restored per rank by checkpoints), and every
collective of the trainer (fixed sequence, fixed reduction order for a given world size and backend).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["deterministic_mode"]


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
