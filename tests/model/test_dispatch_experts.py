import pytest
import torch

from molm_ds.model.dispatch import LocalDispatcher
from molm_ds.model.experts import AttentionExperts, MLPExperts


def _loop_moe(experts_fn, x_TD, idx_TK, weights_TK):
    """Per-token loop: y_t = sum_k w_tk f_{idx_tk}(x_t)."""
    T, K = idx_TK.shape
    rows = []
    for t in range(T):
        acc = torch.zeros_like(experts_fn(0, x_TD[t : t + 1])[0])
        for s in range(K):
            e = int(idx_TK[t, s])
            if e >= 0:
                acc = acc + weights_TK[t, s] * experts_fn(e, x_TD[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("T,K,E,D", [(1, 1, 3, 5), (7, 2, 4, 3), (5, 4, 6, 7), (9, 3, 8, 1)])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_mlp_experts_dispatch_matches_loop(T, K, E, D, activation):
    torch.manual_seed(T * 10 + K)
    experts = MLPExperts(E, D, 6, activation)
    x = torch.randn(T, D, requires_grad=True)
    # experts 0 .. E-1 chosen at random (some get no tokens), plus a dropped slot
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if T > 2:
        idx[1, 0] = -1
    w = torch.rand(T, K).masked_fill(idx < 0, 0.0).requires_grad_()
    disp = LocalDispatcher(E)
    plan = disp.plan(idx)
    x_ND, counts = disp.dispatch(x, plan), plan.counts_E
    assert int(counts.sum()) == int((idx >= 0).sum())
    y_TKD = disp.undispatch(experts(x_ND, counts), plan)
    y = (w[..., None] * y_TKD).sum(1)
    torch.testing.assert_close(experts(x_ND, counts), experts.forward_reference(x_ND, counts))

    def f(e, xe):
        return experts.act(xe @ experts.w1[e]) @ experts.w2[e]

    ref = _loop_moe(f, x, idx, w)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x, w, experts.w1, experts.w2]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dispatch_hand_computed_order_and_per_slot_rows():
    idx = torch.tensor([[2, 0], [0, -1], [2, 1]])
    x = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)  # row per slot: value t*2+s
    disp = LocalDispatcher(4)
    plan = disp.plan(idx)
    x_ND, counts = disp.dispatch(x, plan), plan.counts_E
    assert counts.tolist() == [2, 1, 2, 0] and plan.counts.host() == [2, 1, 2, 0]
    # expert 0: (t0,s1)=1, (t1,s0)=2; expert 1: (t2,s1)=5; expert 2: (t0,s0)=0, (t2,s0)=4
    assert x_ND.flatten().tolist() == [1, 2, 5, 0, 4]
    back = disp.undispatch(x_ND * 10, plan)
    want = (x * 10).clone()
    want[1, 1] = 0
    assert torch.equal(back, want)


def test_dispatch_rejects_bad_shapes(monkeypatch):
    disp = LocalDispatcher(2)
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        disp.dispatch(torch.randn(3, 4), disp.plan(torch.zeros(2, 1, dtype=torch.long)))
    disp.plan(torch.full((2, 1), 5))  # value checks read tensors (a host sync): only under MOLM_DS_DEBUG=1
    monkeypatch.setenv("MOLM_DS_DEBUG", "1")
    with pytest.raises(ValueError, match="valid are -1"):
        disp.plan(torch.full((2, 1), 5))


def test_dropless_plan_equals_counted_plan():
    """dropless=True skips counting the kept slots (no host sync) and must give the same plan."""
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    disp = LocalDispatcher(3)
    a, b = disp.plan(idx, dropless=True), disp.plan(idx)
    assert torch.equal(a.order_N, b.order_N) and torch.equal(a.counts_E, b.counts_E)
    assert a.counts._host is None and b.counts._host == [2, 2, 2]


def test_attention_experts_q_and_o():
    torch.manual_seed(0)
    ex = AttentionExperts(3, 4, 6)
    x = torch.randn(5, 4)
    counts = torch.tensor([2, 0, 3])
    q = ex.forward_q(x, counts)
    torch.testing.assert_close(q, torch.cat([x[:2] @ ex.w_q[0], x[2:] @ ex.w_q[2]]))
    o = ex.forward_o(q, counts)
    torch.testing.assert_close(o, torch.cat([q[:2] @ ex.w_o[0], q[2:] @ ex.w_o[2]]))
    assert ex.num_experts == 3 and ex(x, counts).shape == (5, 6)


def test_all_dropped_gives_zeros():
    disp = LocalDispatcher(3)
    ex = MLPExperts(3, 4, 5)
    x = torch.randn(2, 4)
    idx = torch.full((2, 2), -1)
    plan = disp.plan(idx)
    x_ND = disp.dispatch(x, plan)
    y = disp.undispatch(ex(x_ND, plan.counts), plan)
    assert x_ND.shape == (0, 4) and torch.equal(y, torch.zeros(2, 2, 4))


@pytest.mark.parametrize("per_slot", [False, True])
def test_empty_batch_round_trips(per_slot):
    """T = 0 (e.g. an expert-parallel rank whose micro-batch is all padding) gives empty outputs of the right width."""
    E, K, D = 4, 2, 5
    experts = MLPExperts(E, D, 6, "gelu_tanh")
    disp = LocalDispatcher(E)
    idx = torch.zeros(0, K, dtype=torch.long)
    x = torch.randn(0, K, D) if per_slot else torch.randn(0, D)
    plan = disp.plan(idx)
    x_ND = disp.dispatch(x, plan)
    assert x_ND.shape == (0, D) and plan.counts_E.tolist() == [0] * E
    y_ND = experts(x_ND, plan.counts)
    assert disp.undispatch(y_ND, plan).shape == (0, K, D)
    assert disp.combine(y_ND, torch.zeros(0, K), plan).shape == (0, D)
