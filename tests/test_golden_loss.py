"""Golden loss trace: a tiny deterministic run whose losses are committed in
tests/assets/losses/tiny_adamw.txt. Refactors that should not change numerics must reproduce it.

Regenerate (only when a numerics change is intended, and say so in the commit):
    MOLM_DS_REGEN_GOLDEN=1 python -m pytest tests/test_golden_loss.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM

TRACE = Path(__file__).parent / "assets" / "losses" / "tiny_adamw.txt"
STEPS = 12


def _run() -> list[float]:
    torch.manual_seed(1234)
    cfg = ModelConfig.from_preset("tiny")
    model = MoLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(99)
    # A learnable stream: token t+1 = (3 * token t + 1) mod V, with random starts.
    starts = torch.randint(0, cfg.vocab_size, (4, 1), generator=gen)
    seq = [starts]
    for _ in range(32):
        seq.append((3 * seq[-1] + 1) % cfg.vocab_size)
    ids = torch.cat(seq, dim=1)
    trace = []
    for _ in range(STEPS):
        out = model(ids[:, :-1])
        lm = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss = lm + 0.01 * out.aux["mi"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return trace


def test_golden_loss_trace():
    torch.set_num_threads(1)  # one reduction order
    trace = _run()
    if os.environ.get("MOLM_DS_REGEN_GOLDEN") == "1":
        TRACE.write_text("".join(f"{x:.6f}\n" for x in trace))
        pytest.skip(f"regenerated {TRACE}")
    golden = [float(x) for x in TRACE.read_text().split()]
    assert len(golden) == STEPS
    assert trace[-1] < trace[0] - 0.5, "the tiny run should learn"
    for step, (got, want) in enumerate(zip(trace, golden), 1):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), f"step {step}: loss {got:.6f} != golden {want:.6f}"
