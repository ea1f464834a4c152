"""The commands of docs/multinode.md, run as printed on hosts named as in the docs (node1, node2).

Each ```console block holds lines ``nodeN$ command``; a test runs them at once, each on its host, in a
workspace laid out as the docs assume (``job.yaml``, ``hostfile``, the checkout's ``launch/`` ...).
The only things a test adds are the environment a cluster would have (``DS_ACCELERATOR=cpu``, ``python``
on PATH) and, for ``mpirun``, the namespace rsh agent in place of ssh (``PRTE_MCA_plm_ssh_agent``, OpenMPI 5)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "multinode.md"
BIN = Path(sys.executable).parent
NAMES = ["node1", "node2"]
TIMEOUT = 900


def blocks(kind: str = "console") -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


def commands(first_words: str) -> list[tuple[int, str]]:
    """(host index, command) of the console block whose first command starts with ``first_words``."""
    for b in blocks():
        lines = [re.match(r"(node\d)\$ (.*)", line) for line in b.strip().splitlines()]
        cmds = [(NAMES.index(m.group(1)), m.group(2)) for m in lines if m]
        if cmds and cmds[0][1].startswith(first_words):
            return cmds
    raise AssertionError(f"docs/multinode.md has no console block starting with {first_words!r}")


def srun_line() -> str:
    for b in blocks("bash"):
        for line in b.splitlines():
            if line.startswith("srun "):
                return line[len("srun "):]
    raise AssertionError("docs/multinode.md has no sbatch script with an srun line")


# The namespace hosts share this machine's cores, and each host's OpenMPI daemon pins its ranks to cores on
# its own, so ranks of both hosts sit pinned on the same cores and cannot move away from other load: a
# 4-rank mpirun training took 189-280 s with two busy processes beside it, 24 s without pinning.
NO_BINDING = {"PRTE_MCA_hwloc_default_binding_policy": "none"}


def env(**extra) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PRTE_MCA_plm_ssh_agent=f"{sys.executable} {REPO / 'scripts' / 'hosts.py'} rsh", **NO_BINDING)
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_molm_ds_tests"))
    for k in list(e):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                 "NCCL_SOCKET_IFNAME", "LOCAL_WORLD_SIZE") or k.startswith("SLURM_"):
            del e[k]
    e.update(extra)
    return e


def workspace(root: Path, shard: str, **job) -> Path:
    """A directory laid out as the docs assume: the checkout's code, ``hostfile`` and ``job.yaml`` (the tiny
    test job on ``shard``, ep_size 4, run_dir ``run``; ``job`` overrides dotted keys)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("launch", "molm_ds", "configs", "ds_configs", "data_prep"):
        (root / d).symlink_to(REPO / d)
    hostfile = re.search(r"```text\n(.*?)```", DOC.read_text(), re.S).group(1)
    (root / "hostfile").write_text(hostfile)
    cfg = yaml.safe_load((REPO / "configs" / "tiny_test.yaml").read_text())
    cfg["data"]["sources"] = [{"path": shard}]
    cfg["run_dir"] = str(root / "run")
    cfg["deepspeed"]["config"] = str(REPO / cfg["deepspeed"]["config"])
    cfg["parallel"].update(ep_size=4, collective_timeout_s=60)
    for key, value in job.items():
        section, field = key.split("__")
        cfg.setdefault(section, {})[field] = value
    (root / "job.yaml").write_text(yaml.safe_dump(cfg))
    return root


def start(h, cmds, ws: Path, per_host_env=None) -> list[subprocess.Popen]:
    return [h.popen(i, ["sh", "-c", cmd], cwd=ws, env=env(**((per_host_env or {}).get(i, {}))),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i, cmd in cmds]


def wait(procs, timeout=TIMEOUT, check=True) -> list[str]:
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if check:
        for p, o in zip(procs, outs):
            assert p.returncode == 0, o[-6000:]
    return outs
