"""Every router of a from-scratch model learns under MoLM's gates (full-softmax gates, not
renormalised), with the shipped defaults and the demo's recipe on the embedded corpus.

"Learns" (docs/router_learning.md): H(m|x) / log E over the training tokens of the last 10 steps is
at most 0.5 for every router, attention and MLP: tiny after 50 steps of the demo recipe (lr 1e-2),
small after 60 steps at lr 3e-3. With the released router init (`router_init: released`) the MLP
routers stay above 0.99 (uniform) in both, which is what this test guards against.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from molm_ds.config import ModelConfig
from molm_ds.data import DataSource, MixtureLoader
from molm_ds.model import MoLM
from molm_ds.train.schedule import lr_factor

pytestmark = pytest.mark.slow

WINDOW, MAX_H_REL = 10, 0.5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_prep.embedded import build_embedded

    out = str(tmp_path_factory.mktemp("embedded"))
    build_embedded(out, vocab_size=512, say=lambda _: None)
    return out


def train_h_rel(corpus: str, preset: str = "tiny", lr: float = 1e-2, steps: int = 50, **overrides) -> dict[str, float]:
    """configs/demo.yaml's recipe in one process (peak lr, 10 warmup steps, cosine over 150 steps to 0.1,
    AdamW (0.9, 0.95) with decay 0.1 on matrices, clip 1.0, CE + 0.01 MI, 8 x 64 tokens of prose and
    code), stopped after `steps` steps. Returns H(m|x)/log E per router over the last WINDOW steps."""
    torch.manual_seed(1234)
    model = MoLM(ModelConfig.from_preset(preset, **overrides)).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    data = MixtureLoader([DataSource(f"{corpus}/shards/prose", 0.5), DataSource(f"{corpus}/shards/code", 0.5)],
                         seq_len=64, micro_batch_size=8, seed=1234)
    subs = {f"L{i}/{kind}": m for i, b in enumerate(model.blocks) for kind, m in (("attn", b.attn), ("mlp", b.mlpf))}
    ent = dict.fromkeys(subs, 0.0)
    tokens = 0
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, warmup_steps=10, total_steps=150, min_ratio=0.1)
        b = data.next_batch()
        out = model(b["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten()) + 0.01 * out.aux["mi"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > steps - WINDOW:
            for name, m in subs.items():
                ent[name] += float(torch.special.entr(m.last_routing.probs_TE.float()).sum())
            tokens += b["input_ids"].numel()
    return {name: ent[name] / tokens / math.log(m.num_experts) for name, m in subs.items()}


@pytest.mark.parametrize("preset,lr,steps", [("tiny", 1e-2, 50), ("small", 3e-3, 60)])
def test_every_router_learns_from_scratch_with_the_default_init(corpus, preset, lr, steps):
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine spin instead of working
    h_rel = train_h_rel(corpus, preset, lr, steps)
    assert ModelConfig.from_preset(preset).renormalize_topk is False  # MoLM's gates, as released
    stuck = {k: round(v, 3) for k, v in h_rel.items() if v > MAX_H_REL}
    assert not stuck, f"{preset}: routers with H(m|x)/log E > {MAX_H_REL} after {steps} steps: {stuck} (all: {h_rel})"
