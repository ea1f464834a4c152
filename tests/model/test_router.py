import math

import pytest
import torch
import torch.nn.functional as F

from molm_ds.model.router import Router, drop_over_capacity, expert_choice


def _router(**kw):
    torch.manual_seed(0)
    args = dict(d_model=8, num_experts=5, top_k=2, gating_size=6)
    args.update(kw)
    return Router(**args)


def test_molm_router_formula_and_unrenormalised_gates():
    r = _router()
    x = torch.randn(7, 8)
    out = r(x)
    logits = F.gelu(x @ r.proj.weight.t() + r.proj.bias) @ r.w_gate.t()
    torch.testing.assert_close(out.logits_TE, logits)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(out.probs_TE, probs)
    top = probs.topk(2, -1)
    assert torch.equal(out.idx_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, top.values)  # full-softmax probabilities
    assert (out.weights_TK.sum(-1) < 1).all()


def test_renormalize_and_linear():
    r = _router(renormalize_topk=True, router_type="linear")
    x = torch.randn(4, 8)
    out = r(x)
    assert r.w_gate.shape == (5, 8) and r.proj is None
    torch.testing.assert_close(out.logits_TE, x @ r.w_gate.t())
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(4))


def test_mask_drops_padded_tokens():
    r = _router()
    mask = torch.tensor([True, False, True])
    out = r(torch.randn(3, 8), mask)
    assert (out.idx_TK[1] == -1).all() and (out.weights_TK[1] == 0).all()
    assert (out.idx_TK[[0, 2]] >= 0).all()


def test_sample_topk_training_only():
    r = _router(top_k=3, sample_topk=2)
    x = torch.randn(50, 8)
    r.eval()
    out = r(x)
    assert torch.equal(out.idx_TK, out.probs_TE.topk(3, -1).indices)
    r.train()
    torch.manual_seed(1)
    out = r(x)
    assert torch.equal(out.idx_TK[:, 0], out.probs_TE.argmax(-1))  # first k - sample_topk are fixed
    assert all(len(set(row.tolist())) == 3 for row in out.idx_TK)  # no repeats
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(1, out.idx_TK))
    assert not torch.equal(out.idx_TK, out.probs_TE.topk(3, -1).indices)


def test_drop_over_capacity_hand_computed():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # slot-major arrival: first choices 0,0,0,1 then second choices 1,2,1,0. capacity 2:
    # expert 0 keeps tokens 0,1 (token 2's first choice and token 3's second dropped);
    # expert 1: token 3 (first choice), token 0 (second) kept, token 2 second dropped.
    got = drop_over_capacity(idx, 3, 2)
    want = torch.tensor([[0, 1], [0, 2], [-1, -1], [1, -1]])
    assert torch.equal(got, want)


def test_capacity_factor_weights_zero_for_dropped():
    r = _router(capacity_factor=0.5)
    out = r(torch.randn(20, 8))
    cap = math.ceil(0.5 * 20 * 2 / 5)
    counts = torch.bincount(out.idx_TK[out.idx_TK >= 0], minlength=5)
    assert (counts <= cap).all()
    assert (out.weights_TK[out.idx_TK < 0] == 0).all()
    assert (out.idx_TK < 0).any()
    r.eval()  # eval is dropless (dropping depends on later tokens: not causal)
    assert (r(torch.randn(20, 8)).idx_TK >= 0).all()


def test_expert_choice_each_expert_takes_top_c():
    probs = torch.softmax(torch.randn(6, 3), -1)
    w, idx = expert_choice(probs, k=1, capacity_factor=1.0, mask_T=None)  # c = ceil(6/3) = 2
    for e in range(3):
        tokens = sorted((idx == e).any(-1).nonzero().flatten().tolist())
        assert tokens == sorted(probs[:, e].topk(2).indices.tolist())
    torch.testing.assert_close(w, probs.gather(1, idx.clamp_min(0)) * (idx >= 0))


def test_expert_choice_falls_back_in_eval():
    r = _router(routing="expert_choice")
    x = torch.randn(9, 8)
    r.train()
    tr = r(x)
    assert tr.idx_TK.shape[0] == 9
    r.eval()
    ev = r(x)
    assert torch.equal(ev.idx_TK, ev.probs_TE.topk(2, -1).indices)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        Router(8, 3, 4)
    with pytest.raises(ValueError, match="sample_topk"):
        Router(8, 3, 1, sample_topk=2)
