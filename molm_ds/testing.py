"""What the test suite shares (like ``torch.testing``): synthetic shards, tiny job files, gloo ranks,
launched commands, TensorBoard event reading. The fixtures built on these live in ``tests/conftest.py``
(one session-wide copy of each expensive artefact); test modules import helpers from here, never from
each other.

    shard = write_shard(tmp_path / "data")                       # learnable tokens + a complete manifest
    load_job(TINY_JOB, tiny_job_overrides(shard, tmp_path / "run"))
    results = run_ranks(worker, world_size=2, args=(...))        # worker(rank, world_size, *args) on gloo
    out = run_command(deepspeed_cmd(2) + job_args(shard, run_dir))   # a launch from the checkout

Workers for ``run_ranks`` live in an importable module (``tests/<dir>/_*_workers.py``, imported as
``tests.<dir>._..._workers``): ranks (forked from a preloaded forkserver) import them by that name, with the parent's ``sys.path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from molm_ds import rundir
from molm_ds.checkpoint import is_complete, list_expert_files, tag_for

__all__ = [
    # data and job files
    "REPO", "TINY_JOB", "BIN", "TIMEOUT", "synthetic_tokenizer_sha256", "write_shard", "tiny_job_overrides",
    "read_metrics", "write_ds_config", "write_yaml", "corpus_lines",
    # ranks and launched commands
    "run_ranks", "train_in_ranks", "free_port", "launch_env", "job_args", "check", "run_command", "deepspeed_cmd",
    "assert_trained", "start", "wait_for_steps", "ranks_of", "wait_gone",
    # TensorBoard, models, disks
    "event_dirs", "load_events", "scalars", "perturbed", "EXPORT_MODELS", "tmpfs", "read_only", "fill",
]

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = REPO / "configs" / "tiny_test.yaml"
BIN = Path(sys.executable).parent  # the venv's deepspeed, mpirun, lm_eval
TIMEOUT = 600  # seconds for one launched command


# ---- data and job files --------------------------------------------------------------------------------

def synthetic_tokenizer_sha256(vocab: int) -> str:
    """Stands in for the SHA-256 of a tokenizer file: one per vocabulary size, so shards written here with
    the same ``vocab`` count as one tokenizer and can be mixed."""
    return hashlib.sha256(f"synthetic tokenizer, vocab {vocab}".encode()).hexdigest()


def write_shard(directory: str | os.PathLike, *, n_docs: int = 120, doc_len: int = 300, vocab: int = 512,
                seed: int = 0) -> str:
    """A learnable token stream (each doc walks t -> (5t + 3) mod (vocab - 8) from a random start; EOS=2).
    Returns the shard directory, with a complete manifest as build_shards writes it (shard sizes, dtype,
    a tokenizer hash for ``vocab``; the loader refuses a directory without one)."""
    from data_prep.indexed_writer import IndexedShardWriter

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "part-00000")
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        t = int(rng.integers(8, vocab))
        doc = []
        for _ in range(doc_len - 1):
            doc.append(t)
            t = 8 + (5 * t + 3) % (vocab - 8)
        docs.append(np.array(doc + [2], dtype=np.uint16))
    w = IndexedShardWriter(prefix, np.uint16)
    w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    n_docs_written, n_tokens = w.finish()
    shard = {"prefix": "part-00000", "docs": n_docs_written, "tokens": n_tokens,
             "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx")}
    manifest = {"format": 2, "dtype": "uint16", "documents": n_docs_written, "tokens": n_tokens,
                "tokenizer": {"vocab_size": vocab, "eos_id": 2, "bos_id": 1, "pad_id": 3, "unk_id": 0,
                              "model_path": None, "sha256": synthetic_tokenizer_sha256(vocab)},
                "shards": [shard]}
    Path(directory, "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def tiny_job_overrides(shard: str, run_dir: str | os.PathLike, **extra) -> list[str]:
    """--set overrides that point the tiny test job at a shard and a run directory."""
    out = [f"data.sources=[{{path: '{shard}'}}]", f"run_dir={run_dir}"]
    out += [f"{k}={v}" for k, v in extra.items()]
    return out


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict]:
    """metrics.jsonl of a run as {step: row}."""
    with open(os.path.join(run_dir, rundir.METRICS)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows}


def write_ds_config(path: str | os.PathLike, **cfg) -> str:
    Path(path).write_text(json.dumps(cfg))
    return str(path)


def write_yaml(path: str | os.PathLike, data: dict) -> str:
    import yaml

    Path(path).write_text(yaml.safe_dump(data))
    return str(path)


def corpus_lines() -> list[str]:
    """Non-empty lines of text that ships with Python (pydoc topics and three stdlib modules), for tokenizers."""
    import pydoc_data.topics
    import sysconfig

    lines = [line for t in pydoc_data.topics.topics.values() for line in t.split("\n") if line.strip()]
    lib = sysconfig.get_paths()["stdlib"]
    for name in ("argparse.py", "json/decoder.py", "textwrap.py"):
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            lines += [line for line in f.read().split("\n") if line.strip()]
    return lines


# ---- gloo ranks in one test ----------------------------------------------------------------------------

def free_port() -> int:
    from molm_ds.train.distributed import free_port as _free_port

    return _free_port()


# Ranks are forked from a server that imported these once per test process: a spawned rank spent ~5 s of
# CPU importing torch, DeepSpeed and torch's compiler stack (DeepSpeed's ZeRO optimizer check imports its Muon
# optimizer, which compiles at import) before any work, and the suite starts hundreds of ranks.
RANK_PRELOAD = ["torch", "torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "molm_ds.train",
                "molm_ds.parallel"]


def _entry(rank: int, world_size: int, port: int, out_dir: str, env: dict, fn, args) -> None:
    import torch
    import torch.distributed as dist

    # as a spawned rank: the caller's environment now, not the server's when it started
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from molm_ds.parallel import comm
    from molm_ds.parallel.groups import skip_cpu_shm_comm

    skip_cpu_shm_comm()  # gloo alone is what these tests need
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        comm.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = ()) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; each rank's (picklable) return value, in
    rank order. A failing rank raises here with its traceback. Ranks are forked from a forkserver that has
    imported ``RANK_PRELOAD`` (started by the first call, then shared by every later one in this process);
    each gets this process's environment at the call, and nothing else of its state, as a spawned rank would."""
    import multiprocessing

    import torch
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts (the first call)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, dict(os.environ), fn, args),
                           nprocs=world_size, join=True, start_method="forkserver")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _train_job(rank: int, world_size: int, config: str, overrides: list[str]) -> None:
    from molm_ds.jobs import run
    from molm_ds.train import load_job

    run(load_job(config, overrides))


def train_in_ranks(config, overrides=(), world_size: int = 2) -> None:
    """The job ``config`` (with ``--set`` overrides) trained by ``world_size`` gloo ranks of :func:`run_ranks`:
    a reference run for a launched one, without a launcher's processes (the launch itself is what such a
    test checks; the reference only has to train the same job)."""
    run_ranks(_train_job, world_size, args=(str(config), list(overrides)))


# ---- launched commands ---------------------------------------------------------------------------------

def launch_env(**extra) -> dict:
    """The environment of a launched command: CPU, the venv's tools first, this checkout's code, one thread
    per rank, no rank variables left by an in-process test."""
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # a private JIT cache for any DeepSpeed op a launch builds (the CPU shm-comm op is skipped unless
    # MOLM_DS_CPU_SHM_COMM=1), so builds with other flags elsewhere never invalidate it
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_molm_ds_tests"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def job_args(shard, run_dir, *extra, ep_size: int = 2) -> list[str]:
    """``launch/pretrain.py`` arguments for the tiny job on ``shard`` into ``run_dir`` (ep_size 2: 2 ranks)."""
    args = ["launch/pretrain.py", "--config", str(TINY_JOB)]
    for o in tiny_job_overrides(shard, run_dir, **{"parallel.ep_size": ep_size}) + list(extra):
        args += ["--set", o]
    return args


def check(proc: subprocess.CompletedProcess) -> str:
    """stdout + stderr of a finished command that must have succeeded."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def run_command(cmd, **kw) -> str:
    """Run ``cmd`` from the checkout with :func:`launch_env`; its output (it must succeed)."""
    return check(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=TIMEOUT,
                                **kw))


def deepspeed_cmd(n: int) -> list[str]:
    """``deepspeed --num_gpus n`` on a free port."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port())]


def assert_trained(run_dir, steps=4):
    """The tiny job at ep_size 2 trained ``steps`` steps: metrics, validation, a complete checkpoint with one
    file per global expert (2 layers x (attention + MLP) x 4 experts, though each rank holds 2)."""
    rows = read_metrics(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    assert all(r["loss"] > 0 for r in rows.values()) and "val_loss" in rows[steps]
    assert is_complete(rundir.checkpoint_dir(run_dir), tag_for(steps))
    files = list(list_expert_files(rundir.checkpoint_dir(run_dir), tag_for(steps)).values())
    assert len(files) == 16
    return rows


def start(cmd) -> subprocess.Popen:
    """``cmd`` started from the checkout in its own session (signals go to it alone), output merged."""
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_steps(run_dir, n, proc, timeout=300):
    """Until metrics.jsonl has a row for step n or later (the job ending first fails the test)."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if max(read_metrics(run_dir), default=0) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("the job did not train")


def ranks_of(proc) -> list:
    """The rank processes (psutil) under a launcher (not DeepSpeed's per-node launch.py)."""
    import psutil

    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "pretrain.py" in cmd and "deepspeed.launcher.launch" not in cmd:
            out.append(p)
    return out


def wait_gone(procs, timeout=120):
    """Every process in ``procs`` ends within ``timeout`` (the ones left are killed and fail the test)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"orphans left running: {[p.pid for p in alive]}"


# ---- TensorBoard event files ---------------------------------------------------------------------------

def event_dirs(root: str) -> list[str]:
    return sorted({d for d, _, files in os.walk(root) if any(f.startswith("events.out.tfevents") for f in files)})


def load_events(directory: str):
    """TensorBoard's own reader (EventAccumulator) over one event directory, nothing sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(root: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event directory under root."""
    out: dict[str, dict[int, float]] = {}
    for d in event_dirs(root):
        acc = load_events(d)
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ---- models with every shape and option --------------------------------------------------------------

SHRINK = dict(vocab_size=300, d_model=32, att_hidden=32, ffd_hidden=48, gating_size=16, n_layer=2)  # widths only
VARIANTS = {
    "released_multihead": dict(kv_proj=True, att_hidden=48, n_head=3, k_att=3),
    "sb_2410_swiglu_linear_renorm": dict(stickbreaking_include_current=False, mlp_activation="swiglu",
                                         router_type="linear", renormalize_topk=True),
    "kv_proj_one_head": dict(kv_proj=True, n_head=1),
    "training_only_options": dict(routing="expert_choice", capacity_factor=1.25, sample_topk=1, dropout=0.1),
}


def perturbed(cfg, seed: int = 0):
    """``MoLM(cfg)`` in eval mode with every weight moved away from the init (routing and norms not trivial)."""
    import torch

    from molm_ds.model import MoLM

    torch.manual_seed(seed)
    m = MoLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def _pruned(counts_att, counts_mlp):
    from molm_ds.config import ModelConfig
    from molm_ds.monitor import SubLayer
    from molm_ds.prune import prune_model

    base = perturbed(ModelConfig.from_preset("tiny", n_head=1), seed=3)
    keep = {SubLayer(i, "attn"): list(range(n)) for i, n in enumerate(counts_att)}
    keep.update({SubLayer(i, "mlp"): list(range(4 - n, 4)) for i, n in enumerate(counts_mlp)})
    return prune_model(base, keep).eval()


def _export_models():
    from molm_ds.config import ModelConfig, preset_names

    for name in preset_names():
        over = {} if name in ("tiny", "small") else SHRINK
        yield f"preset-{name}", lambda name=name, over=over: perturbed(ModelConfig.from_preset(name, **over))
    for name, over in VARIANTS.items():
        yield name, lambda over=over: perturbed(ModelConfig.from_preset("tiny", **over))
    yield "pruned-uniform", lambda: _pruned([2, 2], [1, 1])
    yield "pruned-per-layer", lambda: _pruned([4, 1], [3, 2])


# {name: factory}: a model per preset shape (widths shrunk), per model option, and pruned (uniform and
# per-layer expert counts); the factories build nothing until called
EXPORT_MODELS = dict(_export_models())


# ---- real filesystem faults (root only) ---------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of ``size`` at ``path`` (skips the test where mounting is not allowed)."""
    import pytest

    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path):
    """``path`` bind-mounted read-only onto itself (root ignores chmod, not a read-only mount)."""
    import pytest

    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory, leave: int = 0) -> None:
    """Write a filler file until the filesystem is full, then give back ``leave`` bytes."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        os.truncate(path, max(0, os.path.getsize(path) - leave))
