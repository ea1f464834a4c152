"""A dead peer on one machine (issue 22's case): kill -9 of rank 1 of 2 in the middle of training. Rank 0
ends within the collective timeout plus seconds with one line, not a gloo traceback: which rank on which
host stopped answering, the step, the last complete checkpoint and `--resume auto`; no rank is left."""

import os
import re
import signal
import socket
import time

import pytest

from molm_ds import checkpoint as ckpt
from molm_ds.testing import TIMEOUT, deepspeed_cmd, job_args, ranks_of, start, wait_for_steps, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_kill9_of_a_rank_ends_the_other_with_the_lost_peer_line(shard, tmp_path):
    run_dir = tmp_path / "run"
    p = start(deepspeed_cmd(2) + job_args(shard, run_dir, "training.steps=400", "checkpoint.interval=3",
                                          "training.eval_interval=0", "monitor.tensorboard=false",
                                          "parallel.collective_timeout_s=30"))
    wait_for_steps(run_dir, 5, p)
    ranks = ranks_of(p)
    victim = max(ranks, key=lambda r: "--local_rank=1" in " ".join(r.cmdline()))
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    out = p.communicate(timeout=TIMEOUT)[0]
    took = time.monotonic() - t0
    wait_gone(ranks)
    print(f"\nTIMING one host, kill -9 of rank 1 of 2: the launcher ended {took:.1f} s later")
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out[-4000:]
    d = os.path.join(run_dir, "checkpoints")
    last = os.path.join(d, ckpt.newest_complete(d))
    m = re.fullmatch(rf"error: rank 0 on {re.escape(socket.gethostname())}: lost peer: rank 1 on host "
                     rf"{re.escape(socket.gethostname())} \(127\.0\.0\.1\) stopped answering at step (\d+) \(collective "
                     rf"timeout 30 s\); last complete checkpoint: {re.escape(last)}; continue with --resume auto "
                     r"\(any world size\)", lines[0])
    assert m and int(m.group(1)) >= 5, lines[0]
    assert "Traceback" not in out and p.returncode != 0
    assert ckpt.verify(d, ckpt.newest_complete(d)) is None
