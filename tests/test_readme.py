"""The README's training commands work as printed, in order, in a fresh clone: each run has its own run
directory (after `make demo`, runs/demo holds the demo's), and `--resume auto` continues the run before it
with a raised `training.steps`. As root, mpirun needs the flags the README names for that case."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molm_ds.testing import REPO, free_port

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


def _env(root: Path = REPO) -> dict:
    e = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(root),
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


def fresh_clone(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked and new, not ignored: no runs/, data/, .venv)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def test_readme_training_commands(tmp_path):
    """Every command of the Training section, in order, as printed (their own small budgets and run
    directories), in a fresh clone after the corpus is built. Only what the machine needs is added: a free
    port for deepspeed, and mpirun's root flags where the tests run as root (the README says so)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to clone from")
    clone = fresh_clone(tmp_path / "clone")
    cmds = section_commands("Training")
    assert len(cmds) >= 4 and any(c.split()[1:2] == ["python"] for c in cmds if c.startswith("DS_ACCELERATOR"))
    subprocess.run([sys.executable, "-m", "data_prep.embedded", "--out", "data/embedded"], cwd=clone,
                   env=_env(clone), check=True, capture_output=True, timeout=300)
    exported, prev_steps = {}, 0
    for cmd in cmds:
        argv = shlex.split(cmd, comments=True)
        if argv[0] == "export":  # export VAR=value: for the commands after it
            exported.update(a.split("=", 1) for a in argv[1:])
            continue
        env = {**_env(clone), **exported}
        while "=" in argv[0]:  # leading VAR=value assignments
            k, v = argv.pop(0).split("=", 1)
            env[k] = v
        if argv[0] == "mpirun" and os.geteuid() == 0:
            argv[1:1] = ["--allow-run-as-root", "--oversubscribe"]
        if argv[0] == "deepspeed":
            argv[1:1] = ["--master_port", str(free_port())]
        p = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-4000:]}"
        steps = int(next(a.split("=", 1)[1] for a in reversed(argv) if a.startswith("training.steps=")))
        run_dir = clone / next(a.split("=", 1)[1] for a in reversed(argv) if a.startswith("run_dir="))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        train = {r["step"]: r for r in map(json.loads, filter(None, lines)) if "loss" in r}
        assert max(train) == steps and train[steps]["loss"] > 0, (cmd, sorted(train))
        if "--resume" in argv:  # the earlier rows stay, the run went on from there
            assert "resumed from" in p.stdout + p.stderr and prev_steps in train and prev_steps < steps, cmd
        prev_steps = steps
