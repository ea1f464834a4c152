"""Partitions and lost nodes, on hosts made of network namespaces: the cable of host 1 is pulled in the
middle of a step (`ip link set ... down`), or every process of host 1 is killed. Every surviving rank
ends within the collective timeout plus a few seconds, with one line naming the lost peer, the step and
the last complete checkpoint; no rank is left on any host; every complete checkpoint still verifies;
`--resume auto` on host 0 alone (half the world) finishes the job; and under `torchrun --nnodes=1:2
--max-restarts` host 0 continues by itself. The seconds each case took are printed (run with -s) and
quoted in docs/multinode.md."""

import re
import time
from pathlib import Path

import pytest

from molm_ds.train import checkpoint as ckpt
from molm_ds.train.distributed import free_port
from tests.multihost.conftest import REPO
from tests.multihost.test_train_hosts import BIN, TIMEOUT, deepspeed_no_ssh, env, job_args, torchrun
from tests.train.helpers import read_metrics, write_shard

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.multihost]

STEPS = 24
FAULT_AFTER = 6  # metrics rows before the fault: the ranks are then inside step 7 or later
COLLECTIVE_TIMEOUT = 15


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("data"))


def long_job(shard, run_dir, *extra, ep=4):
    return job_args(shard, run_dir, f"training.steps={STEPS}", "checkpoint.interval=2", "training.eval_interval=0",
                    f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT}", *extra, ep=ep)


def wait_for_rows(run_dir, n, procs, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    path = Path(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].communicate()[0][-4000:]
        time.sleep(0.1)
    raise AssertionError(f"no {n} metrics rows in {timeout} s")


def wait_all(procs, timeout=TIMEOUT) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


LINE = re.compile(r"^error: rank (\d) on (\S+): lost peer: rank (\d), (\d) on host (\S+) \((\S+)\) stopped answering "
                  r"at step (\d+) \(collective timeout 15 s\); last complete checkpoint: (\S+); continue with --resume auto",
                  re.M)


def lost_lines(out: str) -> list[tuple]:
    return LINE.findall(out)


def assert_checkpoints_intact(run_dir) -> str:
    d = str(Path(run_dir, "checkpoints"))
    done = [t for t in ckpt.list_tags(d) if ckpt.is_complete(d, t)]
    assert done
    for t in done:
        assert ckpt.verify(d, t) is None, ckpt.verify(d, t)
    return str(Path(d, done[-1]))


def resume_on_host0(h, shard, run_dir):
    """--resume auto on the host that is left: 2 ranks (ep_size 2, grad_accum 4 keeps the global batch)."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())] + long_job(
        shard, run_dir, "training.grad_accum_steps=4", ep=2) + ["--resume", "auto"]
    p = h.run(0, cmd, cwd=REPO, env=env(),
              capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    out = p.stdout + p.stderr
    assert "resumed from" in out and "rank 1 of 2" in out
    rows = read_metrics(run_dir)
    assert max(rows) == STEPS and ckpt.is_complete(str(Path(run_dir, "checkpoints")), f"step_{STEPS:08d}")


@pytest.mark.parametrize("fault", ["kill", "cut"])
def test_lost_host_ends_every_survivor_with_one_line_then_resumes_on_the_other(fault, hosts2, shard, tmp_path):
    h = hosts2
    run_dir = tmp_path / "run"
    procs = deepspeed_no_ssh(h, tmp_path, long_job(shard, run_dir))
    wait_for_rows(run_dir, FAULT_AFTER, procs)
    t0 = time.monotonic()
    if fault == "kill":
        h.kill(1)
    else:
        h.cut(1)
    outs = wait_all(procs)
    took = time.monotonic() - t0
    print(f"\nTIMING {fault}: every launcher ended {took:.1f} s after the fault (collective timeout {COLLECTIVE_TIMEOUT} s)")
    assert h.pids() == []  # no rank left on any host
    last = assert_checkpoints_intact(run_dir)
    survivors = (0,) if fault == "kill" else (0, 1)
    for i in survivors:
        lines = lost_lines(outs[i])
        assert sorted(int(x[0]) for x in lines) == [2 * i, 2 * i + 1], outs[i][-4000:]  # each survivor, once
        other = 1 - i
        for rank, host, r1, r2, lost_host, addr, step, named in lines:
            assert host == h.hostname(i) and (lost_host, addr) == (h.hostname(other), h.addr(other))
            assert {int(r1), int(r2)} == {2 * other, 2 * other + 1}
            assert int(step) > FAULT_AFTER and named == last
        assert "Traceback" not in outs[i]
    resume_on_host0(h, shard, run_dir)


def test_torchrun_elastic_continues_by_itself_on_the_host_that_is_left(hosts2, shard, tmp_path):
    h = hosts2
    run_dir = tmp_path / "run"
    procs = torchrun(h, long_job(shard, run_dir, ep=2) + ["--resume", "auto"], elastic=True, restarts=2, last_call=20)
    wait_for_rows(run_dir, FAULT_AFTER, procs)
    t0 = time.monotonic()
    h.kill(1)
    saved = read_metrics(run_dir)
    while max(read_metrics(run_dir)) <= max(saved) and procs[0].poll() is None:  # until the restarted world trains
        time.sleep(0.2)
    resumed_after = time.monotonic() - t0
    out = wait_all(procs[:1])[0]
    took = time.monotonic() - t0
    print(f"\nTIMING torchrun elastic: training again {resumed_after:.1f} s after the kill, done {took:.1f} s after it")
    assert procs[0].returncode == 0, out[-6000:]
    assert lost_lines(out)  # the first world ended with the line, then the agent restarted it
    assert "rank 1 of 2" in out and "resumed from" in out
    assert max(read_metrics(run_dir)) == STEPS
    assert_checkpoints_intact(run_dir)
    assert h.pids() == []
