"""The README's training commands work as printed (on a tiny budget: a few steps, a temporary run
directory). As root, mpirun needs the flags the README names for that case."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from molm_ds.testing import REPO, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BIN = Path(sys.executable).parent


def section_commands(title: str) -> list[str]:
    """Command lines (not comments, not `source`) of the bash blocks under README heading `## title`."""
    text = (REPO / "README.md").read_text()
    body = re.split(r"^## ", text, flags=re.M)
    section = next(b for b in body if b.startswith(title))
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith(("#", "source "))]
    return lines


def _env() -> dict:
    e = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
             OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _set(argv: list[str], key: str) -> str | None:
    vals = [argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv[:-1]) if a == "--set" and argv[i + 1].startswith(key + "=")]
    return vals[-1] if vals else None


def test_readme_runs_do_not_collide_with_the_demo_or_each_other():
    """After `make demo`, runs/demo holds the demo's finished run: every training command of the README names
    its own run_dir, and a --resume continues the command before it with more steps (the total)."""
    cmds = [shlex.split(c, comments=True) for c in section_commands("Training") + section_commands("After training")]
    cmds = [c for c in cmds if any(a.endswith("launch/pretrain.py") for a in c)]
    assert len(cmds) >= 5
    seen, prev = set(), None
    for argv in cmds:
        run_dir, steps = _set(argv, "run_dir"), _set(argv, "training.steps")
        assert run_dir and run_dir != "runs/demo" and steps, " ".join(argv)
        if "--resume" in argv:
            assert prev and run_dir == prev[0] and int(steps) > int(prev[1]), " ".join(argv)
        else:
            assert run_dir not in seen, " ".join(argv)
        seen.add(run_dir)
        prev = (run_dir, steps)


def test_readme_training_commands(tmp_path):
    cmds = section_commands("Training")
    assert len(cmds) >= 4 and any(c.split()[1:2] == ["python"] for c in cmds if c.startswith("DS_ACCELERATOR"))
    subprocess.run([sys.executable, "-m", "data_prep.embedded", "--out", "data/embedded"], cwd=REPO, env=_env(),
                   check=True, capture_output=True, timeout=300)
    budget = ["--set", "training.eval_interval=0", "--set", "checkpoint.interval=0", "--set", "monitor.log_interval=1",
              "--set", "training.warmup_steps=1"]
    steps, run_dir, exported = 0, None, {}
    for i, cmd in enumerate(cmds):
        argv = shlex.split(cmd, comments=True)
        if argv[0] == "export":  # export VAR=value: for the commands after it
            exported.update(a.split("=", 1) for a in argv[1:])
            continue
        env = {**_env(), **exported}
        while "=" in argv[0]:  # leading VAR=value assignments
            k, v = argv.pop(0).split("=", 1)
            env[k] = v
        if argv[0] == "mpirun" and os.geteuid() == 0:
            argv[1:1] = ["--allow-run-as-root", "--oversubscribe"]
        if argv[0] == "deepspeed":
            argv[1:1] = ["--master_port", str(29500 + os.getpid() % 1000)]
        resume = "--resume" in argv  # continues the previous command's run
        steps = steps + 1 if resume else 2
        run_dir = run_dir if resume else tmp_path / f"run{i}"
        argv += budget + ["--set", f"run_dir={run_dir}", "--set", f"training.steps={steps}"]
        p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-4000:]}"
        rows = read_metrics(run_dir)
        assert max(rows) == steps and rows[steps]["loss"] > 0, (cmd, rows)
        if resume:
            assert "resumed from" in p.stdout + p.stderr, cmd
