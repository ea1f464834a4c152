"""LoadSums / load_stats against per-token Python loops and hand-computed cases."""

import math

import pytest
import torch

from molm_ds.monitor.stats import STAT_NAMES, LoadSums, load_stats


def brute_force(probs, idx, mask, E):
    """Statistics by explicit loops over tokens and slots (the slow path)."""
    counts = [0] * E
    p_sum = [0.0] * E
    ent = 0.0
    tokens = slots = dropped = 0
    for t in range(probs.shape[0]):
        if mask is not None and not bool(mask[t]):
            continue
        tokens += 1
        for e in range(E):
            p = float(probs[t, e])
            p_sum[e] += p
            ent -= p * math.log(p) if p > 0 else 0.0
        for k in range(idx.shape[1]):
            slots += 1
            if int(idx[t, k]) < 0:
                dropped += 1
            else:
                counts[int(idx[t, k])] += 1
    mean = sum(counts) / E
    var = sum((c - mean) ** 2 for c in counts) / E
    pm = [p / tokens for p in p_sum]
    h_m = -sum(p * math.log(p) for p in pm if p > 0)
    total = sum(counts)
    return {
        "shares": [c / total for c in counts],
        "max_over_mean_load": max(counts) / mean,
        "min_over_mean_load": min(counts) / mean,
        "cv": math.sqrt(var) / mean,
        "dead_experts": sum(c == 0 for c in counts),
        "dropped_frac": dropped / slots,
        "H_m": h_m,
        "H_m_given_x": ent / tokens,
        "mi": h_m - ent / tokens,
    }


def random_routing(T, E, K, seed, drop=0.0, masked=False):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=g) * 2, -1)
    idx = torch.topk(probs, K, -1).indices
    if drop:
        idx[torch.rand(T, K, generator=g) < drop] = -1
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    return probs, idx, mask


@pytest.mark.parametrize("T,E,K,drop,masked", [(1, 1, 1, 0.0, False), (7, 3, 2, 0.0, False), (33, 8, 2, 0.25, True),
                                                (50, 5, 1, 0.1, False), (20, 16, 4, 0.0, True)])
def test_matches_brute_force(T, E, K, drop, masked):
    probs, idx, mask = random_routing(T, E, K, seed=T * 100 + E, drop=drop, masked=masked)
    sums = LoadSums.from_routing(probs_TE=probs, idx_TK=idx, mask_T=mask, num_experts=E)
    got = load_stats(sums)
    want = brute_force(probs, idx, mask, E)
    assert set(got) == set(STAT_NAMES)
    assert sums.shares().tolist() == pytest.approx(want["shares"], abs=1e-12)
    assert float(sums.shares().sum()) == pytest.approx(1.0, abs=1e-12)
    for k in STAT_NAMES:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_sums_are_additive():
    """Sums of two halves == sums of the whole batch (what the all-reduce relies on)."""
    probs, idx, mask = random_routing(40, 6, 2, seed=1, drop=0.2, masked=True)
    whole = LoadSums.from_routing(probs_TE=probs, idx_TK=idx, mask_T=mask, num_experts=6)
    a = LoadSums.from_routing(probs_TE=probs[:17], idx_TK=idx[:17], mask_T=mask[:17], num_experts=6)
    b = LoadSums.from_routing(probs_TE=probs[17:], idx_TK=idx[17:], mask_T=mask[17:], num_experts=6)
    for x, y in zip((a + b).as_tuple(), whole.as_tuple()):
        torch.testing.assert_close(x, y)
    flat = whole.flatten()
    assert flat.shape == (2 * 6 + 4,)
    for x, y in zip(LoadSums.unflatten(flat, 6).as_tuple(), whole.as_tuple()):
        torch.testing.assert_close(x, y)


def test_hand_computed_collapse_and_uniform():
    # Two tokens, three experts, k=1; everything on expert 0: one expert carries all, two dead.
    probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    s = load_stats(LoadSums.from_routing(probs_TE=probs, idx_TK=torch.tensor([[0], [0]]), num_experts=3))
    assert s["max_over_mean_load"] == pytest.approx(3.0)
    assert s["dead_experts"] == 2
    assert s["cv"] == pytest.approx(math.sqrt(2.0))  # counts (2,0,0): mean 2/3, std sqrt(8/9)
    assert s["H_m"] == pytest.approx(0.0) and s["mi"] == pytest.approx(0.0)
    # Confident and balanced routing: H(m) = log 2, H(m|x) = 0, MI = log 2.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = load_stats(LoadSums.from_routing(probs_TE=probs, idx_TK=torch.tensor([[0], [1]]), num_experts=2))
    assert s["mi"] == pytest.approx(math.log(2)) and s["cv"] == 0.0 and s["dead_experts"] == 0


def test_all_dropped_and_empty():
    probs = torch.full((3, 2), 0.5)
    s = LoadSums.from_routing(probs_TE=probs, idx_TK=torch.full((3, 2), -1), num_experts=2)
    assert s.shares().tolist() == [0.0, 0.0]
    st = load_stats(s)
    assert st["dropped_frac"] == 1.0 and math.isnan(st["cv"]) and st["dead_experts"] == 2
    assert all(math.isnan(v) for k, v in load_stats(LoadSums.zeros(4)).items() if k != "dead_experts")


def test_bad_input_is_a_clear_error():
    probs = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="num_experts"):
        LoadSums.from_routing(probs_TE=probs, idx_TK=torch.zeros(2, 1, dtype=torch.long), num_experts=4)
    with pytest.raises(ValueError, match="outside"):
        LoadSums.from_routing(probs_TE=probs, idx_TK=torch.tensor([[3], [0]]), num_experts=3)
    with pytest.raises(ValueError, match="mask_T"):
        LoadSums.from_routing(probs_TE=probs, idx_TK=torch.zeros(2, 1, dtype=torch.long), num_experts=3,
                              mask_T=torch.ones(5, dtype=torch.bool))
