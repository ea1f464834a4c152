"""Deterministic mode under expert parallelism: the all-to-all dispatcher's gather and combine take the same
sorted, atomic-free paths as the local one and still match it exactly (2 gloo ranks, the special cases of
test_ep_dispatch.py)."""

import pytest
import torch
from _det_dispatch_workers import deterministic_dispatch_worker
from molm_ds.testing import run_ranks


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_all_to_all_matches_local_dispatcher_deterministic():
    names = ["random", "nothing_to_rank1", "rank0_empty_batch"]
    results = run_ranks(deterministic_dispatch_worker, 2, args=(4, 2, 6, 5, names))
    for rank, out in enumerate(results):
        for (name, form), r in out.items():
            for key in ("y", "gx", "gw1", "gw2", "comb", "gcx", "gcw"):
                torch.testing.assert_close(r[key], r["ref_" + key], rtol=1e-12, atol=1e-12,
                                           msg=f"rank {rank} case {name} x[{form}]: {key}")
