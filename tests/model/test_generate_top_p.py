"""Nucleus (top-p) sampling in molm_ds.model.generate: the kept set on a hand-computed case, top_p = 1
keeps everything, a tiny top_p is greedy, and the most likely token always stays."""

import math

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.model.generate import top_p_filter


def test_nucleus_on_a_hand_computed_case():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    logits = probs.log()
    # sorted 0.5, 0.3, 0.1, ...: mass before each is 0, 0.5, 0.8 -> p = 0.75 keeps {0, 2}; p = 0.85 adds 1
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[True, False, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.85)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[True, False, False, False, False]]
    kept = top_p_filter(logits, 0.75)
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])  # kept logits unchanged


def test_top_p_in_generate():
    torch.manual_seed(0)
    m = MoLM(ModelConfig.from_preset("tiny")).eval()
    x = torch.randint(0, 512, (2, 5))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(m.generate(x, 6, do_sample=True, top_p=1e-6, generator=g), m.generate(x, 6))  # greedy
    a = m.generate(x, 6, do_sample=True, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = m.generate(x, 6, do_sample=True, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(x, 2, do_sample=True, top_p=0.0)
    assert not math.isnan(float(a.float().mean()))
