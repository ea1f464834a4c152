"""Auxiliary-loss-free balancing in the router (``router_balance: bias``): the bias chooses, the probabilities
weigh, no gradient reaches it, the counts and the update match a brute-force loop, and the counts of one
step do not depend on how its tokens are split into micro-batches. Ranks: tests/train/test_balance_ranks.py."""

from __future__ import annotations

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.model.router import Router, bias_update, expert_counts
from molm_ds.train.balance import bias_routers, update_router_biases

CFG = ModelConfig.from_preset("tiny", router_balance="bias", router_bias_rate=0.01)


def _router(E=6, k=2, **kw) -> Router:
    torch.manual_seed(0)
    return Router(16, E, k, gating_size=8, balance="bias", **kw)


def brute_force_update(bias, idx_rows, rate):
    """One step by hand: count every chosen (token, slot), compare each count with the mean, move by rate."""
    E = len(bias)
    load = [0] * E
    for row in idx_rows:
        for e in row:
            if e >= 0:
                load[e] += 1
    mean = sum(load) / E
    return [b + (rate if load[e] < mean else -rate if load[e] > mean else 0.0) for e, b in enumerate(bias)]


def test_bias_chooses_probabilities_weigh():
    r = _router().train()
    x = torch.randn(40, 16)
    plain = r(x)
    with torch.no_grad():
        r.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))  # expert 5 wins every token
    biased = r(x)
    assert (biased.idx_TK == 5).any(-1).all() and not (plain.idx_TK == 5).all()
    assert torch.equal(biased.weights_TK, biased.probs_TE.gather(1, biased.idx_TK))  # unbiased gates
    assert torch.equal(biased.probs_TE, plain.probs_TE)
    want = (biased.probs_TE + r.expert_bias_E).topk(2, dim=-1).indices
    assert torch.equal(biased.idx_TK, want)


def test_no_gradient_reaches_the_bias():
    r = _router().train()
    with torch.no_grad():
        r.expert_bias_E.normal_()
    assert "expert_bias_E" in dict(r.named_buffers()) and "expert_bias_E" not in dict(r.named_parameters())
    out = r(torch.randn(10, 16, requires_grad=True))
    (out.weights_TK.sum() + out.probs_TE.square().sum()).backward()
    assert r.expert_bias_E.grad is None and not r.expert_bias_E.requires_grad
    assert r.w_gate.grad is not None


def test_counts_and_update_match_brute_force():
    r = _router(E=5, k=2).train()
    mask = torch.ones(30, dtype=torch.bool)
    mask[[3, 17]] = False  # padded tokens count nowhere
    steps_idx = []
    for _ in range(3):  # three micro-batches, one step
        steps_idx.append(r(torch.randn(30, 16), mask).idx_TK)
    idx = torch.cat(steps_idx)
    assert torch.equal(r.load_E, torch.tensor([int((idx == e).sum()) for e in range(5)]))
    before = r.expert_bias_E.tolist()
    update_router_biases(r)
    assert r.load_E is None
    assert r.expert_bias_E.tolist() == pytest.approx(brute_force_update(before, idx.tolist(), 1e-3), abs=1e-7)
    # ties with the mean do not move; sign rule on a hand case
    got = bias_update(bias_E=torch.zeros(4), load_E=torch.tensor([2, 6, 4, 4]), rate=0.5)
    assert got.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert expert_counts(torch.tensor([[0, 2], [2, -1]]), 3).tolist() == [1, 0, 2]


def test_eval_and_recomputation_do_not_count():
    m = MoLM(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    m(ids)
    assert all(r.load_E is None for r in bias_routers(m))
    m.train()
    m.activation_checkpointing = True
    out = m(ids)
    out.logits.sum().backward()  # the recomputation in backward routes again; it must not count
    for r in bias_routers(m):
        assert int(r.load_E.sum()) == ids.numel() * r.top_k


def _step_bias(model: MoLM, chunks) -> list[torch.Tensor]:
    model.train()
    for ids in chunks:
        model(ids)
    update_router_biases(model)
    return [r.expert_bias_E.clone() for r in bias_routers(model)]


def test_one_micro_batch_of_four_equals_four_of_one():
    torch.manual_seed(1)
    a = MoLM(CFG)
    b = MoLM(CFG)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (4, 16))
    got_a = _step_bias(a, [ids])
    got_b = _step_bias(b, list(ids.split(1)))
    assert any(g.abs().sum() > 0 for g in got_a)
    for x, y in zip(got_a, got_b):
        assert torch.equal(x, y)


def test_skipped_step_keeps_bias_and_drops_counts():
    m = MoLM(CFG).train()
    m(torch.randint(0, CFG.vocab_size, (2, 8)))
    update_router_biases(m, applied=False)
    assert all(float(r.expert_bias_E.abs().sum()) == 0 and r.load_E is None for r in bias_routers(m))


def test_config_rejects_bias_with_expert_choice():
    with pytest.raises(ValueError, match="token_choice"):
        ModelConfig.from_preset("tiny", router_balance="bias", routing="expert_choice")
    with pytest.raises(ValueError, match="sample_topk"):
        ModelConfig.from_preset("tiny", router_balance="bias", sample_topk=1)


def test_surgery_and_pruning_carry_the_bias():
    from molm_ds.continual.surgery import grow_experts
    from molm_ds.monitor import SubLayer
    from molm_ds.prune import prune_model

    m = MoLM(CFG)
    with torch.no_grad():
        for r in bias_routers(m):
            r.expert_bias_E.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    pruned = prune_model(m, {SubLayer(0, "attn"): [0, 2], SubLayer(0, "mlp"): [1, 2, 3],
                             SubLayer(1, "attn"): [0, 1, 2, 3], SubLayer(1, "mlp"): [3]})
    assert pruned.blocks[0].attn.router.expert_bias_E.tolist() == pytest.approx([0.1, 0.3])
    assert pruned.blocks[0].mlpf.router.expert_bias_E.tolist() == pytest.approx([-0.2, 0.3, 0.0])
    assert pruned.blocks[1].mlpf.router.expert_bias_E.tolist() == pytest.approx([0.0])
    pruned.train()(torch.randint(0, CFG.vocab_size, (1, 5)))  # routes and counts on the pruned sizes
    update_router_biases(pruned)
    grow_experts(m, attention=1, mlp=2, seed=0)
    assert m.blocks[0].attn.router.expert_bias_E.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0, 0.05])
    assert m.blocks[1].mlpf.router.expert_bias_E.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0, 0.05, 0.05])
    m.train()(torch.randint(0, CFG.vocab_size, (1, 5)))
    update_router_biases(m)


def test_compiled_forward_counts_like_eager():
    """training.compile (fullgraph at ep_size 1): the counting is traced into the graph, same loads and bias."""
    torch.manual_seed(2)
    eager = MoLM(CFG).train()
    compiled = MoLM(CFG).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.forward = torch.compile(compiled.forward, backend="eager", fullgraph=True)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    for _ in range(2):
        for m in (eager, compiled):
            m(ids).logits.sum().backward()
        assert [r.load_E.tolist() for r in bias_routers(compiled)] == [r.load_E.tolist() for r in bias_routers(eager)]
        update_router_biases(eager)
        update_router_biases(compiled)
    assert all(torch.equal(a.expert_bias_E, b.expert_bias_E) for a, b in zip(bias_routers(eager), bias_routers(compiled)))
