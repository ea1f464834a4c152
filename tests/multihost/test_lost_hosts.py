"""Partitions and lost nodes, with the commands of docs/multinode.md on hosts made of network namespaces:
node2's cable is pulled in the middle of a step (`ip link set ... down`), or every process of node2 is
killed. Every surviving rank ends within the collective timeout plus a few seconds, with one line naming
the lost peer, the step and the last complete checkpoint; no rank is left on any host; every complete
checkpoint still verifies; the docs' `--resume auto` command on node1 alone (half the world) finishes the
job; and under the docs' `torchrun --nnodes 1:2 --max-restarts` command node1 continues by itself. The
seconds each case took are printed (run with -s); docs/multinode.md quotes them."""

import re
import time
from pathlib import Path

import pytest

from molm_ds import checkpoint as ckpt
from tests.multihost import doc_commands as doc
from molm_ds.testing import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.multihost]

STEPS = 24
FAULT_AFTER = 6  # metrics rows before the fault: the ranks are then inside step 7 or later
TIMEOUT_S = 15

LINE = re.compile(rf"^error: rank (\d) on (\S+): lost peer: rank (\d), (\d) on host (\S+) \((\S+)\) stopped answering "
                  rf"at step (\d+) \(collective timeout {TIMEOUT_S} s\); last complete checkpoint: (\S+); continue with "
                  r"--resume auto", re.M)


@pytest.fixture
def nodes(make_hosts):
    return make_hosts(2, names=doc.NAMES)


def long_job(tmp_path, shard):
    return doc.workspace(tmp_path / "ws", shard, training__steps=STEPS, training__eval_interval=0,
                         checkpoint__interval=2, parallel__collective_timeout_s=TIMEOUT_S)


def wait_for_rows(run_dir, n, procs, timeout=doc.TIMEOUT):
    deadline = time.monotonic() + timeout
    path = Path(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].communicate()[0][-4000:]
        time.sleep(0.1)
    raise AssertionError(f"no {n} metrics rows in {timeout} s")


def assert_checkpoints_intact(run_dir) -> str:
    d = str(Path(run_dir, "checkpoints"))
    done = [t for t in ckpt.list_tags(d) if ckpt.is_complete(d, t)]
    assert done
    for t in done:
        assert ckpt.verify(d, t) is None, ckpt.verify(d, t)
    return str(Path(d, done[-1]))


@pytest.mark.parametrize("fault", ["kill", "cut"])
def test_lost_host_ends_every_survivor_with_one_line_then_resumes_on_the_other(fault, nodes, shard, tmp_path):
    h, ws = nodes, long_job(tmp_path, shard)
    procs = doc.start(h, doc.commands("deepspeed --hostfile hostfile --no_ssh"), ws)
    wait_for_rows(ws / "run", FAULT_AFTER, procs)
    t0 = time.monotonic()
    if fault == "kill":
        h.kill(1)
    else:
        h.cut(1)
    outs = doc.wait(procs, check=False)
    took = time.monotonic() - t0
    print(f"\nTIMING {fault}: every launcher ended {took:.1f} s after the fault (collective timeout {TIMEOUT_S} s)")
    for i, o in enumerate(outs):  # what each host said, for the record (-s)
        print("\n".join(f"  node{i + 1}: {ln[:160]}" for ln in o.splitlines() if "error: rank" in ln or "sigkill" in ln))
    assert h.pids() == []  # no rank left on any host
    last = assert_checkpoints_intact(ws / "run")
    for i in (0,) if fault == "kill" else (0, 1):
        lines = LINE.findall(outs[i])
        assert sorted(int(x[0]) for x in lines) == [2 * i, 2 * i + 1], outs[i][-4000:]  # each survivor, once
        other = 1 - i
        for rank, host, r1, r2, lost_host, addr, step, named in lines:
            assert host == h.hostname(i) and (lost_host, addr) == (h.hostname(other), h.addr(other))
            assert {int(r1), int(r2)} == {2 * other, 2 * other + 1}
            assert int(step) >= FAULT_AFTER and named == last  # the step in progress (or its save)
        assert "Traceback" not in outs[i]
    # the docs' command on the host that is left: 2 ranks, ep_size 2, the same global batch
    h.mend(1)
    out = doc.wait(doc.start(h, doc.commands("deepspeed --num_gpus 2"), ws))[0]
    assert f"resumed from {last}" in out and "rank 1 of 2" in out
    assert max(read_metrics(ws / "run")) == STEPS and assert_checkpoints_intact(ws / "run").endswith(f"{STEPS:08d}")


def test_torchrun_elastic_continues_by_itself_on_the_host_that_is_left(nodes, shard, tmp_path):
    h, ws = nodes, long_job(tmp_path, shard)
    procs = doc.start(h, doc.commands("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1:2"), ws)
    wait_for_rows(ws / "run", FAULT_AFTER, procs)
    t0 = time.monotonic()
    h.kill(1)
    before = max(read_metrics(ws / "run"))
    while procs[0].poll() is None and "resumed from" not in Path(ws / "run" / "metrics.jsonl").read_text() \
            and max(read_metrics(ws / "run")) <= before + 2:
        time.sleep(0.2)
    again = time.monotonic() - t0
    out = doc.wait(procs[:1])[0]
    print(f"\nTIMING torchrun elastic: training again {again:.1f} s after the kill, done {time.monotonic() - t0:.1f} s after")
    assert "lost peer: rank 2, 3 on host node2" in out, out[-6000:]  # the first world's end; then the restart at 2 ranks
    assert "rank 1 of 2" in out and "resumed from" in out
    assert max(read_metrics(ws / "run")) == STEPS
    assert_checkpoints_intact(ws / "run")
    assert h.pids() == []
