"""AllToAllDispatcher against LocalDispatcher (the reference): hand-computed stages, then 2 gloo ranks
(outputs, gradients of the input and of the experts), including a rank that receives no tokens, a
rank that sends none and a rank with an empty batch."""

import pytest
import torch
from molm_ds.testing import run_ranks
from tests.parallel._ep_dispatch_workers import dispatch_worker

from molm_ds.model.dispatch import permute_by_expert
from molm_ds.parallel.dispatch import regroup_order


def test_permute_by_expert_hand_computed():
    idx = torch.tensor([[2, 0], [-1, 2], [1, 0]])  # flat slots 0..5
    order, counts = permute_by_expert(idx, 4)
    assert counts.tolist() == [2, 1, 2, 0]
    # expert 0: slots 1, 5; expert 1: slot 4; expert 2: slots 0, 3; then the dropped slot 2
    assert order.tolist() == [1, 5, 4, 0, 3, 2]


def test_regroup_order_hand_computed():
    # arrivals from 2 source ranks, 2 local experts: [q0e0: 2 rows][q0e1: 1][q1e0: 1][q1e1: 2]
    recv = torch.tensor([[2, 1], [1, 2]])
    # rows 0..5 = a0 a1 | b0 | c0 | d0 d1 ; expert-major: e0 <- a0 a1 c0, e1 <- b0 d0 d1
    assert regroup_order(recv, 6).tolist() == [0, 1, 3, 2, 4, 5]
    assert regroup_order(torch.zeros(2, 3, dtype=torch.long), 0).tolist() == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_all_to_all_matches_local_dispatcher_2_ranks():
    names = ["random", "nothing_to_rank1", "rank0_sends_none", "rank0_empty_batch"]
    results = run_ranks(dispatch_worker, 2, args=(4, 2, 6, 5, names))
    for rank, out in enumerate(results):
        for (name, form), r in out.items():
            where = f"rank {rank} case {name} x[{form}]"
            torch.testing.assert_close(r["counts_El"], r["ref_counts_El"], msg=where)
            for key in ("y", "gx", "gw1", "gw2", "comb", "gcx", "gcw"):
                torch.testing.assert_close(r[key], r["ref_" + key], rtol=1e-12, atol=1e-12, msg=f"{where}: {key}")
    # the special cases really were special
    assert results[1][("nothing_to_rank1", "TD")]["rows"] == 0
    assert results[0][("rank0_sends_none", "TD")]["y"].abs().sum() == 0
    assert results[0][("rank0_empty_batch", "TKD")]["y"].shape[0] == 0
