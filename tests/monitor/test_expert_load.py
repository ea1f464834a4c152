"""ExpertLoadTracker on the real model: which forwards count, and counts equal a direct bincount."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from molm_ds.config import ModelConfig
from molm_ds.model import MoEMLP, MoESubLayer, MoLM
from molm_ds.monitor import ExpertLoadTracker, SubLayer


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_preset("tiny")


def direct_counts(module):
    r = module.last_routing
    idx = r.idx_TK if r.mask_T is None else r.idx_TK[r.mask_T]
    return torch.bincount(idx[idx >= 0], minlength=module.num_experts).double()


def test_finds_every_sublayer_and_counts_training_forwards(cfg):
    torch.manual_seed(0)
    model = MoLM(cfg).train()
    tracker = ExpertLoadTracker(model)
    assert tracker.sublayers == [SubLayer(l, k) for l in range(cfg.n_layer) for k in ("attn", "mlp")]
    mods = {SubLayer(i, "attn"): b.attn for i, b in enumerate(model.blocks)}
    mods.update({SubLayer(i, "mlp"): b.mlpf for i, b in enumerate(model.blocks)})
    want = {k: torch.zeros(m.num_experts, dtype=torch.float64) for k, m in mods.items()}
    for step in range(2):  # two micro-batches, the second with padding
        ids = torch.randint(0, cfg.vocab_size, (3, 9))
        mask = torch.ones(3, 9, dtype=torch.long)
        if step == 1:
            mask[0, :4] = 0
        model(ids, attention_mask=mask).logits.sum().backward()
        for k, m in mods.items():
            want[k] += direct_counts(m)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 5)))  # validation forward: not counted
    got = tracker.reduce()
    for k in mods:
        torch.testing.assert_close(got[k].counts_E, want[k])
        assert float(got[k].tokens) == 3 * 9 + 3 * 9 - 4
        assert float(got[k].shares().sum()) == pytest.approx(1.0)
    tracker.reset()
    assert all(float(s.tokens) == 0 for s in tracker.reduce().values())
    tracker.close()
    model.train()(torch.randint(0, cfg.vocab_size, (1, 4)))
    assert all(float(s.tokens) == 0 for s in tracker.reduce().values())  # hooks removed


def test_activation_checkpoint_recompute_is_not_counted_twice(cfg):
    torch.manual_seed(0)
    layer = MoEMLP(cfg)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([layer])

        def forward(self, x):
            return checkpoint(lambda y: self.blocks[0](y)[0], x, use_reentrant=True)

        def moe_sublayers(self):  # a model publishes its MoE sub-layers (molm_ds.model.sublayers)
            return [MoESubLayer(SubLayer(0, "mlp"), "blocks.0", layer)]

    model = Wrap().train()
    tracker = ExpertLoadTracker(model)
    x = torch.randn(2, 6, cfg.d_model, requires_grad=True)
    model(x).sum().backward()
    assert float(tracker.reduce()[SubLayer(0, "mlp")].tokens) == 12
