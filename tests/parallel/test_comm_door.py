"""One door to the network: no file outside molm_ds/parallel/ calls a torch.distributed (or
deepspeed.comm) collective; they go through molm_ds.parallel.comm, which puts tensors on the backend's
device. The expert all-to-all lives in molm_ds/parallel/ too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from molm_ds.parallel import comm

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("molm_ds", "launch", "data_prep", "benchmarks", "scripts")
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "gather",
    "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "monitored_barrier",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def _dist_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to a distributed module, and collectives imported by name."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)
    return modules, functions


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def collective_calls(path: Path) -> list[tuple[int, str]]:
    """(line, call) of every distributed collective called in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = _dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            found.append((node.lineno, f"{f.id}()"))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and _dotted(f.value) in modules | DIST_MODULES:
            found.append((node.lineno, f"{_dotted(f.value)}.{f.attr}()"))
    return sorted(found)


def test_no_collective_outside_parallel():
    offenders = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            if (REPO / "molm_ds" / "parallel") in path.parents:
                continue
            offenders += [f"{path.relative_to(REPO)}:{line} {call}" for line, call in collective_calls(path)]
    assert not offenders, "collectives outside molm_ds/parallel/ (use molm_ds.parallel.comm): " + "; ".join(offenders)


def test_the_scan_finds_collectives(tmp_path):
    """The scan must be able to fail: every spelling of a collective is found, plain calls are not."""
    src = tmp_path / "x.py"
    src.write_text("import torch.distributed as dist\nimport torch\nfrom torch.distributed import barrier as b\n"
                   "import deepspeed.comm as dscomm\n"
                   "dist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\nb()\ndscomm.all_gather(x, y)\n"
                   "dist.get_rank()\n")
    assert [c for _, c in collective_calls(src)] == [
        "dist.all_reduce()", "torch.distributed.broadcast()", "b()", "dscomm.all_gather()"]


def test_comm_without_process_group_is_the_identity():
    x = torch.tensor([1.0, 2.0])
    for op in comm.ReduceOp:
        y = comm.all_reduce(x, op)
        assert torch.equal(y, x) and y is not x
    assert comm.reduce_metrics({"a": 1.5}, {"a": comm.ReduceOp.MEAN}) == {"a": 1.5}
    assert comm.broadcast_object({"k": 1}) == {"k": 1} and comm.all_gather_object(3) == [3]
    assert comm.world_size() == 1 and comm.rank() == 0 and comm.comm_device() == torch.device("cpu")
    with pytest.raises(KeyError, match="no reduce op declared"):
        comm.reduce_metrics({"a": 1.0}, {})
