import math

import pytest
import torch

from molm_ds.losses import load_concentration_loss, mi_loss, router_norm_penalty, switch_loss, z_loss


def test_mi_uniform_is_zero():
    probs = torch.full((5, 4), 0.25)
    assert mi_loss(probs_TE=probs).item() == pytest.approx(0.0, abs=1e-6)


def test_mi_one_hot_balanced_is_minus_log_n():
    probs = torch.eye(4).repeat(2, 1)  # 8 tokens, each expert twice, confident
    assert mi_loss(probs_TE=probs).item() == pytest.approx(-math.log(4), abs=1e-6)


def test_mi_one_hot_collapsed_is_zero():
    probs = torch.zeros(6, 3)
    probs[:, 1] = 1
    assert mi_loss(probs_TE=probs).item() == pytest.approx(0.0, abs=1e-6)


def test_mi_hand_computed_two_tokens():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # H(m|x) = (log 2 + 0) / 2; p(m) = (0.75, 0.25); H(m) = -(.75 log .75 + .25 log .25)
    want = 0.5 * math.log(2) + (0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mi_loss(probs_TE=probs).item() == pytest.approx(want, abs=1e-6)


def test_p_pooled_over_given_tokens_and_mask():
    # pooled over the micro-batch: two one-hot tokens on different experts -> balanced -> -log 2;
    # each token alone would give 0. The mask removes the third (padding) token entirely.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([True, True, False])
    assert mi_loss(probs_TE=probs, mask_T=mask).item() == pytest.approx(-math.log(2), abs=1e-6)
    per_token = [mi_loss(probs_TE=probs[i : i + 1]).item() for i in range(2)]
    assert per_token == pytest.approx([0.0, 0.0], abs=1e-6)
    # an externally pooled p(m) (e.g. all-reduced over ranks) replaces the local one
    got = mi_loss(probs_TE=probs[:1], p_E=torch.tensor([0.5, 0.5]))
    assert got.item() == pytest.approx(-math.log(2), abs=1e-6)


def test_load_concentration():
    assert load_concentration_loss(probs_TE=torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4))
    one = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    assert load_concentration_loss(probs_TE=one).item() == pytest.approx(0.0, abs=1e-6)
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([True, True, False])
    assert load_concentration_loss(probs_TE=mixed, mask_T=mask).item() == pytest.approx(math.log(2))


def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0], [1]])
    # f = (1/2, 1/2, 0); P = (0.4, 0.4, 0.2); 3 * (0.2 + 0.2) = 1.2
    assert switch_loss(probs_TE=probs, idx_TK=idx).item() == pytest.approx(1.2)
    # dropped slots and masked tokens do not count
    idx2 = torch.tensor([[0, -1], [1, 2]])
    mask = torch.tensor([True, False])
    # f = (1, 0, 0); P = (0.7, 0.2, 0.1) -> 3 * 0.7
    assert switch_loss(probs_TE=probs, idx_TK=idx2, mask_T=mask).item() == pytest.approx(2.1)


def test_switch_balanced_uniform_is_one():
    probs = torch.full((4, 4), 0.25)
    idx = torch.arange(4)[:, None]
    assert switch_loss(probs_TE=probs, idx_TK=idx).item() == pytest.approx(1.0)


def test_z_loss():
    logits = torch.zeros(3, 4)
    assert z_loss(logits_TE=logits).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    mask = torch.tensor([True, False])
    assert z_loss(logits_TE=logits, mask_T=mask).item() == pytest.approx(math.log(2) ** 2)


def test_router_norm_penalty_and_grad():
    rows = torch.tensor([[1.0, 2.0], [0.0, -2.0]], requires_grad=True)
    val = router_norm_penalty(new_rows_NR=rows)
    assert val.item() == pytest.approx(9.0)
    (g,) = torch.autograd.grad(val, rows)
    torch.testing.assert_close(g, 2 * rows.detach())


def test_keyword_only():
    with pytest.raises(TypeError):
        mi_loss(torch.full((2, 2), 0.5))
