"""Evaluation: mean next-token cross-entropy of a model over batches, token-weighted, over all ranks.

The one evaluation function: the trainer's validation, continual learning's old/new-domain
perplexities and pruning's task perplexities all call ``evaluate``. Every rank must call it with the
same number of batches (expert-parallel forwards and the final reduction are collectives). Sums stay
on the device until the end: one all-reduce and one host transfer per call. No RNG stream moves, so
a resumed run stays bit-identical whether or not it evaluated.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from molm_ds.parallel import comm

__all__ = ["EvalResult", "evaluate", "lm_loss", "rng_preserved"]


def lm_loss(*, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (labels -100 ignored)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token (nats)
    tokens: int  # predicted tokens over all ranks

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


@contextmanager
def rng_preserved():
    """Run a block without moving any RNG stream (python, numpy, torch, CUDA)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], *, group=None) -> EvalResult:
    """Cross-entropy of ``model`` (eval mode: dropless routing) on ``batches`` of {"input_ids",
    "labels"} [B, T] (labels -100 ignored), summed over tokens and all ranks of ``group``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
    with rng_preserved():
        for b in batches:
            logits = model(b["input_ids"].to(device)).logits
            labels = b["labels"].to(device)
            total[0] += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                        reduction="sum").double()
            total[1] += (labels != -100).sum()
    model.train(was_training)
    loss_sum, tokens = comm.all_reduce(total, comm.ReduceOp.SUM, group).tolist()  # the one host transfer
    if tokens == 0:
        raise ValueError("evaluate: no labelled tokens in the batches")
    return EvalResult(loss_sum / tokens, int(tokens))
