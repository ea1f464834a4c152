"""The recorder of would-be CUDA syncs (tests/sync_mode.py) sees each kind it claims to see, and only those."""

from __future__ import annotations

import pytest
import torch

from molm_ds.ops.grouped_gemm import grouped_gemm
from tests.sync_mode import SyncRecorder

x = torch.arange(6.0)
idx = torch.tensor([0, 2, 2, 1])
mask = x > 2

SYNCS = {
    "nonzero": lambda: torch.nonzero(x),
    "where(cond)": lambda: torch.where(mask),
    "masked_select": lambda: x.masked_select(mask),
    "bool index": lambda: x[mask],
    "bool index_put": lambda: x.clone().__setitem__(mask, 0.0),
    "bincount": lambda: torch.bincount(idx),
    "unique": lambda: torch.unique(idx),
    "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(4), idx),
    "item": lambda: x.sum().item(),
    "int": lambda: int(x[0]),
    "bool": lambda: bool(x[0] > 1),
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "cpu": lambda: x.cpu(),
    "equal": lambda: torch.equal(x, x),
}
FREE = {
    "index_select": lambda: x.index_select(0, idx),
    "scatter_add": lambda: torch.zeros(3, dtype=torch.int64).scatter_add_(0, idx, torch.ones_like(idx)),
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(torch.arange(4), idx, output_size=5),
    "where(cond, a, b)": lambda: torch.where(mask, x, 0.0),
    "to(device) of a device tensor": lambda: x.to("cpu"),
    "a molm_ds op (its CPU loop reads the counts inside)": lambda: grouped_gemm(
        torch.ones(4, 3), torch.ones(2, 3, 5), torch.tensor([1, 3])),
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_sees(name):
    with SyncRecorder() as rec:
        rec.active = True
        SYNCS[name]()
    assert rec.events and all(where == "tests/test_sync_mode.py:<lambda>" for where, _ in rec.events), rec.events


@pytest.mark.parametrize("name", sorted(FREE))
def test_free(name):
    with SyncRecorder() as rec:
        rec.active = True
        FREE[name]()
    assert rec.events == []


def test_host_tensors():
    """Reading a host tensor is free, copying it to a device without non_blocking is not."""
    batch = torch.ones(2, 3)
    with SyncRecorder() as rec:
        rec.mark_host(batch)
        rec.active = True
        flag = torch.tensor([1])  # made from Python data: a host tensor
        assert bool(flag.item()) and batch.tolist()
        batch.to("cpu", non_blocking=True)
        assert rec.events == []
        batch.to("cpu")
    assert [what for _, what in rec.events] == ["blocking host-to-device copy (Tensor.to without non_blocking=True)"]


def test_inactive_and_restored():
    orig = torch.Tensor.tolist
    with SyncRecorder() as rec:
        x.tolist()
        torch.nonzero(x)
    assert rec.events == [] and torch.Tensor.tolist is orig
