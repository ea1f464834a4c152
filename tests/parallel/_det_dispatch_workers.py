"""The dispatch worker of test_ep_dispatch.py with torch's deterministic algorithms on (the sorted,
atomic-free combine and token gather of molm_ds.model.dispatch, in both dispatchers)."""

from __future__ import annotations

import torch
from tests.parallel._ep_dispatch_workers import dispatch_worker


def deterministic_dispatch_worker(rank: int, world: int, *args):
    torch.use_deterministic_algorithms(True)
    try:
        return dispatch_worker(rank, world, *args)
    finally:
        torch.use_deterministic_algorithms(False)
