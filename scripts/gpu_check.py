#!/usr/bin/env python
"""The GPU check, piece by piece: ``python scripts/gpu_check.py PART [--cpu-smoke] --out FILE.json``.

``scripts/gpu_check.sh`` runs the parts in this order, each in its own process under a time limit, and
merges their JSON into one file after every part:

  env      device, versions, the two ceilings measured on the card (bf16 matmul TFLOP/s, copy GB/s)
  warm     every Triton kernel variant the later parts launch, compiled in parallel processes (the
           kernels, hang and bench parts and the train part's layer shape, each launched once with
           ``--warm``), so later parts time kernels, not compilers
  kernels  every kernel's outputs and gradients vs the reference in bf16 at the MoLM-350M-4B layer shape
           (D 1024, 16 attention experts of width 1024, 32 MLP experts of hidden 2048, k 2, T 2048-4096),
           the full block against its PyTorch paths, bitwise-repeatable backward
  hang     upstream's hang shape (B 32, heads 32, T 1024, d 32, bf16, current token excluded), 50 runs
  bench    MLP expert GEMMs vs torch._grouped_mm and one dense GEMM of the same FLOPs; the MoE MLP layer vs
           a dense MLP over k*T tokens; stick-breaking fwd+bwd vs SDPA flash at T 4096 (random and
           long-stick logits)
  train    steps of a MoLM with the 350M-4B layer shape through launch/pretrain.py (NCCL, bf16, one GPU;
           12 blocks, 24 where the card has 120 GiB or more): tokens/s, MFU, peak memory, first and last loss
  pytest   ``pytest -m gpu`` over tests/kernels, tests/ops, tests/model and tests/train/test_gpu_train.py
           (pytest-xdist workers where it is installed), under the part's own time limit
  mark     record a part's exit status (the shell script calls it after each part)
  merge    the parts' JSON plus a summary against the issue's targets -> one file

Every part writes its JSON after each check, and a check that raises is recorded as failed with its
error while the next check runs. ``--cpu-smoke`` runs the same code at tiny shapes on the CPU, the
Triton kernels under the interpreter and fp32 instead of bf16 (the interpreter's bf16 dot is broken in
Triton 3.9): ``tests/test_gpu_check_smoke.py`` runs it, so the script is not first run on a GPU. Timings
on the CPU are meaningless and are not reported as figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_PARTS = {"kernels", "hang", "bench", "warm"}
PARTS = ("env", "warm", "kernels", "hang", "bench", "train", "pytest")
HOPPER_BF16_DATASHEET = 989e12  # dense bf16 FLOP/s of the H100 SXM and the H200, vendor datasheets
MFU_TARGET = 0.45

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if "--cpu-smoke" in sys.argv:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if len(sys.argv) > 1 and sys.argv[1] in KERNEL_PARTS:
            # read by @triton.jit when it decorates, so before anything imports Triton
            os.environ.setdefault("TRITON_INTERPRET", "1")
            os.environ.setdefault("MOLM_DS_KERNELS", "triton")

torch = F = None  # imported by main() for the parts that need it (mark and merge start fast without it)


def _import_torch() -> None:
    global torch, F
    import torch as _torch
    import torch.nn.functional as _F

    torch, F = _torch, _F


# ---- reporting ----------------------------------------------------------------------------------
class Report:
    """One part's results, rewritten after every check (atomically)."""

    def __init__(self, path: str, part: str, smoke: bool) -> None:
        self.path, self.t0 = path, time.time()
        self.data = {"part": part, "smoke": smoke, "status": "running", "checks": {}}
        self.save()

    def check(self, name: str, **fields) -> dict:
        fields = {k: _plain(v) for k, v in fields.items()}
        self.data["checks"][name] = fields
        self.save()
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
        return fields

    def set(self, **fields) -> None:
        self.data.update({k: _plain(v) for k, v in fields.items()})
        self.save()

    @contextlib.contextmanager
    def trying(self, name: str):
        """One check: an exception is recorded as this check's failure, and the part goes on."""
        try:
            yield
        except Exception as exc:  # recorded, not fatal: the next check still runs
            import traceback

            traceback.print_exc()
            self.check(name, ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def done(self) -> None:
        failed = [n for n, c in self.data["checks"].items() if c.get("ok") is False]
        self.set(status="failed" if failed else "ok", failed=failed, seconds=round(time.time() - self.t0, 1))

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def _plain(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64; NaN anywhere gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Setup:
    def __init__(self, smoke: bool, warm: bool = False) -> None:
        self.smoke, self.warm = smoke, warm  # warm: launch each kernel once, compare and time nothing
        self.dev = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 dot is broken
        self.tol = 1e-4 if smoke else 1.5e-2  # bf16 operands: 1e-3 .. 1e-2 expected

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.dev) * scale).to(self.dtype)

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, rep_ms: int = 200) -> float:
        """Median ms per call: CUDA events through triton's do_bench on the GPU; a few host-timed calls on the CPU."""
        if self.warm:
            fn()
            self.sync()
            return float("nan")
        if self.dev == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))
        t = time.perf_counter()  # the smoke run checks that the variant runs; its time means nothing
        fn()
        return (time.perf_counter() - t) * 1e3


def _routing(T, K, E, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1)
    gates, idx = probs.topk(K, dim=-1)
    order = torch.argsort(idx.reshape(-1), stable=True)
    return gates, order, torch.bincount(idx.reshape(-1), minlength=E)


# ---- shapes -------------------------------------------------------------------------------------
def layer_shape(smoke: bool) -> dict:
    if smoke:
        return dict(tokens=40, D=32, E=4, H=48, K=2, E_att=4, A=32)
    return dict(tokens=4096, D=1024, E=32, H=2048, K=2, E_att=16, A=1024)  # MoLM-350M-4B, 2 x 2048 tokens


def sb_shapes(smoke: bool) -> list[tuple]:
    # (B, Hq, Hk, T, d): MoLM attention has one 1024-wide head per expert and k 2 queries per token over
    # one shared K = V head; plus the usual multi-head layout
    if smoke:
        return [(1, 2, 1, 33, 32), (1, 2, 2, 40, 16)]
    return [(2, 2, 1, 2048, 1024), (1, 2, 1, 4096, 1024), (2, 16, 16, 2048, 64)]


# ---- part: env ----------------------------------------------------------------------------------
def part_env(rep: Report, s: Setup) -> None:
    import importlib

    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "deepspeed", "pydantic", "numpy"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as exc:  # recorded, not fatal: the next parts say what it breaks
            versions[name] = f"missing: {exc}"
    rep.set(versions=versions, kernels_mode=os.environ.get("MOLM_DS_KERNELS", "auto"))
    if s.dev != "cuda":
        rep.set(device="cpu (smoke)")
        rep.check("ceilings", ok=True, note="not measured on the CPU")
        return
    p = torch.cuda.get_device_properties(0)
    rep.set(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1))
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = s.time_ms(lambda: a @ b)
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_ms = s.time_ms(lambda: y.copy_(x))
    rep.check("ceilings", ok=True, bf16_matmul_tflops=round(2 * n**3 / ms / 1e9, 1),
              copy_gb_per_s=round(2 * x.numel() / copy_ms / 1e6, 1))


# ---- part: pytest -------------------------------------------------------------------------------
GPU_TESTS = ["tests/kernels", "tests/ops", "tests/model", "tests/train/test_gpu_train.py"]
# what molm-ds can import elsewhere but the GPU machine lacks (KINDS.md): the smoke run's pytest hides them,
# so a GPU test that needs one fails here first
NOT_ON_GPU_MACHINE = ("zstandard", "datasets", "lm_eval")


def part_pytest(rep: Report, s: Setup) -> None:
    """``pytest -m gpu`` under the part's own limit (pytest-xdist workers compile kernels side by side)."""
    import importlib.util

    args = ["-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE", *GPU_TESTS]
    if importlib.util.find_spec("xdist") is not None and not s.smoke:
        args[:0] = ["-n", "4"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args[:0] = ["--timeout", "150"]
    runner = (f"import sys\nfor m in {NOT_ON_GPU_MACHINE!r}: sys.modules[m] = None\n"
              "import pytest\nsys.exit(pytest.main(sys.argv[1:]))")
    limit = float(os.environ.get("GPU_CHECK_PART_LIMIT_S", "0")) - 10 or None
    proc = subprocess.Popen([sys.executable, "-c", runner, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit if limit and limit > 0 else None)
        rc = proc.returncode
    except subprocess.TimeoutExpired:  # its own budget spent: keep what it printed
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        rc = 124
    lines = out.strip().splitlines()
    print(out[-6000:])
    summary = lines[-1] if lines else ""
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    ok = rc in (0, 5) if s.smoke else rc == 0  # 5: everything deselected or skipped (no CUDA in the smoke run)
    rep.check("pytest_gpu", ok=ok, rc=rc, summary=summary, failed=failed[:40], timed_out=rc == 124)


# ---- part: warm ---------------------------------------------------------------------------------
def _warm_jobs(smoke: bool) -> dict:
    """One process per group of kernel launches, each the same calls (shapes, dtypes, flags) as its part."""
    flag = ["--cpu-smoke"] if smoke else []
    return {
        "kernels_mlp": ["kernels", "--groups", "mlp"],
        "kernels_stickbreaking": ["kernels", "--groups", "stickbreaking"],
        "kernels_block": ["kernels", "--groups", "block"],
        "train_block": ["kernels", "--groups", "train_block"],
        "hang": ["hang", "--runs", "1"],
        "bench": ["bench"],
    }, flag


def part_warm(rep: Report, s: Setup) -> None:
    """Triton compiles a kernel variant on its first launch; here every variant the later parts launch is
    compiled at once in parallel processes, into the cache they share (TRITON_CACHE_DIR)."""
    import tempfile

    jobs, flag = _warm_jobs(s.smoke)
    cache = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    before = len(list(Path(cache).glob("*"))) if os.path.isdir(cache) else 0
    tmp = tempfile.mkdtemp(prefix="gpu_check_warm_")
    procs = {}
    for name, args in jobs.items():
        log = open(os.path.join(tmp, f"{name}.log"), "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, *flag, "--warm", "--out", os.path.join(tmp, f"{name}.json")]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
    for name, (proc, t0, log) in procs.items():
        rc = proc.wait()
        log.close()
        part = json.load(open(os.path.join(tmp, f"{name}.json"))) if os.path.exists(os.path.join(tmp, f"{name}.json")) else {}
        failed = [n for n, c in part.get("checks", {}).items() if c.get("ok") is False]
        if rc != 0:
            print(open(os.path.join(tmp, f"{name}.log")).read()[-3000:])
        rep.check(f"warm_{name}", ok=rc == 0 and not failed, rc=rc, launches=len(part.get("checks", {})), failed=failed,
                  seconds=round(time.time() - t0, 1))
    after = len(list(Path(cache).glob("*"))) if os.path.isdir(cache) else 0
    rep.set(triton_cache=cache, compiled_entries=after - before, note="no compilation under the interpreter" if s.smoke else None)


# ---- part: kernels ------------------------------------------------------------------------------
def _compare(rep, name, s, fn, ref, inputs, t0=None):
    """Run fn and ref (fp32 math on the same inputs), compare the output and every input's gradient.
    Warm: fn forward and backward once (what compiles its kernels), nothing compared."""
    need = [i for i, t in enumerate(inputs) if t.requires_grad]
    if s.warm:
        y = fn(*inputs)
        torch.autograd.grad(y, [inputs[i] for i in need], torch.ones_like(y))
        s.sync()
        return rep.check(name, ok=True, warmed=True, seconds=round(time.time() - t0, 2) if t0 else None)
    ref_in = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*inputs)
    y_ref = ref(*ref_in)
    dy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [inputs[i] for i in need], dy.to(y.dtype))
    want = torch.autograd.grad(y_ref, [ref_in[i] for i in need], dy)
    errs = {"out": rel(y, y_ref)}
    errs.update({f"d{i}": rel(a, b) for i, a, b in zip(need, got, want)})
    worst = max(errs.values())
    return rep.check(name, ok=worst < s.tol, worst_rel=worst, rel=errs, tol=s.tol,
                     seconds=round(time.time() - t0, 2) if t0 else None)


KERNEL_GROUPS = ("mlp", "stickbreaking", "block")


def part_kernels(rep: Report, s: Setup, groups: tuple = KERNEL_GROUPS) -> None:
    """The checks of ``groups`` (the warm part launches each group in its own process)."""
    if "mlp" in groups:
        _check_mlp_kernels(rep, s)
    if "stickbreaking" in groups:
        _check_stickbreaking(rep, s)
    if "block" in groups:
        with rep.trying("block_triton_vs_torch_paths"):
            _check_block(rep, s)
    if "train_block" in groups:  # the train part's [micro-batch, seq_len] (warm only: it compiles that shape)
        with rep.trying("train_block"):
            from molm_ds.train import load_job

            job = load_job(REPO / "configs" / "gpu_check_350m.yaml", [])
            _check_block(rep, s, B=job.training.micro_batch_size, T=job.data.seq_len, name="train_block")


def _check_mlp_kernels(rep: Report, s: Setup) -> None:
    from molm_ds.ops import grouped_gemm, grouped_gemm_gated, grouped_gemm_gated_reference, grouped_gemm_reference

    torch.manual_seed(0)
    L = layer_shape(s.smoke)
    T, D, E, H, K = L["tokens"], L["D"], L["E"], L["H"], L["K"]
    gates, order, counts = _routing(T, K, E, s.dev)
    x = s.randn(T, D).requires_grad_()
    w1 = s.randn(E, D, H, scale=D**-0.5).requires_grad_()
    w2 = s.randn(E, H, D, scale=H**-0.5).requires_grad_()
    g = gates.clone().requires_grad_()

    def act(h):
        return F.gelu(h, approximate="tanh")

    with rep.trying("mlp_experts_fused"):
        t0 = time.time()
        _compare(rep, "mlp_experts_fused", s,  # the local MLP: gather in GEMM 1, gated combine in GEMM 2
                 lambda x, a, b, g: grouped_gemm_gated(act(grouped_gemm(x, a, counts, src_N=order, fan_in=K)), b, counts, g, order),
                 lambda x, a, b, g: grouped_gemm_gated_reference(act(grouped_gemm_reference(x, a, counts, src_N=order, fan_in=K)),
                                                                 b, counts, g, order), [x, w1, w2, g], t0)
    x_N = s.randn(T * K, D).requires_grad_()
    with rep.trying("mlp_experts_grouped"):
        t0 = time.time()
        _compare(rep, "mlp_experts_grouped", s,  # the MLP behind an all-to-all: rows arrive grouped
                 lambda x, a, b: grouped_gemm(act(grouped_gemm(x, a, counts)), b, counts),
                 lambda x, a, b: grouped_gemm_reference(act(grouped_gemm_reference(x, a, counts)), b, counts), [x_N, w1, w2], t0)
    with rep.trying("attention_projection"):
        _, _, counts_att = _routing(T, K, L["E_att"], s.dev, seed=1)
        w_q = s.randn(L["E_att"], D, L["A"], scale=D**-0.5).requires_grad_()
        t0 = time.time()
        _compare(rep, "attention_projection", s, lambda x, w: grouped_gemm(x, w, counts_att),
                 lambda x, w: grouped_gemm_reference(x, w, counts_att), [x_N, w_q], t0)
    if s.warm:
        return
    with rep.trying("bitwise_repeatable_backward_mlp"):
        y_fn = lambda: grouped_gemm_gated(act(grouped_gemm(x, w1, counts, src_N=order, fan_in=K)), w2, counts, g, order)  # noqa: E731
        dy = s.randn(T, D)
        runs = [torch.autograd.grad(y_fn(), (x, w1, w2, g), dy) for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        rep.check("bitwise_repeatable_backward_mlp", ok=same, mlp_experts=same)


def _check_stickbreaking(rep: Report, s: Setup) -> None:
    from molm_ds.ops import stickbreaking_attention, stickbreaking_reference

    torch.manual_seed(0)
    for B, Hq, Hk, Tq, d in sb_shapes(s.smoke):
        for include in (True, False):
            name = f"stickbreaking_B{B}_Hq{Hq}_Hk{Hk}_T{Tq}_d{d}_{'incl' if include else 'excl'}"
            with rep.trying(name):
                q = s.randn(B, Hq, Tq, d).requires_grad_()
                k = s.randn(B, Hk, Tq, d).requires_grad_()
                v = s.randn(B, Hk, Tq, d).requires_grad_()
                t0 = time.time()
                _compare(rep, name, s, lambda q, k, v: stickbreaking_attention(q, k, v, include_current=include),
                         lambda q, k, v: stickbreaking_reference(q, k, v, include_current=include), [q, k, v], t0)
                del q, k, v
    if s.warm:
        return
    with rep.trying("bitwise_repeatable_backward_stickbreaking"):  # two backward passes, the same bytes: no atomics
        B, Hq, Hk, Tq, d = sb_shapes(s.smoke)[0]
        q, k, v = s.randn(B, Hq, Tq, d).requires_grad_(), s.randn(B, Hk, Tq, d).requires_grad_(), s.randn(B, Hk, Tq, d).requires_grad_()
        do = s.randn(B, Hq, Tq, d)
        runs = [torch.autograd.grad(stickbreaking_attention(q, k, v, include_current=False), (q, k, v), do) for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        rep.check("bitwise_repeatable_backward_stickbreaking", ok=same, stickbreaking=same)


def _check_block(rep: Report, s: Setup, B: int = 1, T: int = 2048, name: str = "block_triton_vs_torch_paths") -> None:
    """One MoLM-350M-4B block (MoA + MoE MLP) on the Triton kernels vs the same block on the PyTorch paths
    (warm: the Triton side once, at the [B, T] the train part runs)."""
    from molm_ds.config import ModelConfig
    from molm_ds.model.transformer import Block

    if s.smoke:
        cfg = ModelConfig.from_preset("tiny")
        B, T = 1, 24
    else:
        cfg = ModelConfig.from_preset("molm-350m-4b")
    torch.manual_seed(3)
    block = Block(cfg).to(s.dev, s.dtype)
    x = s.randn(B, T, cfg.d_model)
    outs, mode = {}, os.environ.get("MOLM_DS_KERNELS")
    t0 = time.time()
    try:
        for backend in ("triton",) if s.warm else ("triton", "torch"):
            os.environ["MOLM_DS_KERNELS"] = backend
            xi = x.clone().requires_grad_()
            y, aux, _ = block(xi)
            loss = y.float().square().mean() + sum(aux.values())
            outs[backend] = (y, torch.autograd.grad(loss, [xi, *block.parameters()]))
    finally:
        if mode is None:
            os.environ.pop("MOLM_DS_KERNELS", None)
        else:
            os.environ["MOLM_DS_KERNELS"] = mode
    if s.warm:
        s.sync()
        rep.check(name, ok=True, warmed=True, shape=[B, T], seconds=round(time.time() - t0, 2))
        return
    names = ["x"] + [n for n, _ in block.named_parameters()]
    errs = {"out": rel(outs["triton"][0], outs["torch"][0])}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, outs["triton"][1], outs["torch"][1])})
    worst_name = max(errs, key=errs.get)
    tol = 3 * s.tol  # both sides round in bf16, through a whole block
    rep.check(name, ok=errs[worst_name] < tol, worst=worst_name, worst_rel=errs[worst_name],
              tol=tol, rel=errs, seconds=round(time.time() - t0, 2))


# ---- part: hang ---------------------------------------------------------------------------------
def part_hang(rep: Report, s: Setup, runs: int) -> None:
    """Upstream's backward hung on a spin lock at this shape; ours has no lock. Every run is timed and
    compared byte for byte with the first; the file is rewritten after each run."""
    from molm_ds.ops import stickbreaking_attention

    B, H, T, d = (1, 2, 40, 8) if s.smoke else (32, 32, 1024, 32)
    torch.manual_seed(0)
    q, k, v = (s.randn(B, H, T, d).requires_grad_() for _ in range(3))
    do = s.randn(B, H, T, d)
    first, times, same, finite = None, [], True, True
    for i in range(runs):
        t = time.perf_counter()
        grads = torch.autograd.grad(stickbreaking_attention(q, k, v, include_current=False), (q, k, v), do)
        s.sync()
        times.append((time.perf_counter() - t) * 1e3)
        finite = finite and all(torch.isfinite(x).all().item() for x in grads)
        if first is None:
            first = grads
        else:
            same = same and all(torch.equal(a, b) for a, b in zip(first, grads))
        rep.check("hang_shape", ok=finite and same and i + 1 == runs, shape=[B, H, T, d], include_current=False,
                  runs_done=i + 1, runs=runs, max_ms=max(times), median_ms=statistics.median(times),
                  finite=finite, bitwise_identical_to_first=same)


# ---- part: bench --------------------------------------------------------------------------------
def part_bench(rep: Report, s: Setup) -> None:
    with rep.trying("mlp_expert_gemms_fwd_bwd"):
        _bench_experts(rep, s)
    with rep.trying("moe_mlp_layer_fwd_bwd"):
        _bench_moe_layer(rep, s)
    with rep.trying("stickbreaking_fwd_bwd"):
        _bench_stickbreaking(rep, s)


def _fwd_bwd(fn, inputs):
    def step():
        y = fn(*inputs)
        torch.autograd.grad(y, [t for t in inputs if t.requires_grad], torch.ones_like(y))
    return step


def _bench_experts(rep: Report, s: Setup) -> None:
    from molm_ds.ops import grouped_gemm, grouped_gemm_gated

    T, D, E, H, K = (48, 32, 4, 48, 2) if s.smoke else (8192, 1024, 32, 2048, 2)  # 4 x 2048 tokens
    N = T * K
    gates, order, counts = _routing(T, K, E, s.dev)
    x = s.randn(T, D).requires_grad_()
    x_N = s.randn(N, D).requires_grad_()
    w1, w2 = s.randn(E, D, H, scale=D**-0.5).requires_grad_(), s.randn(E, H, D, scale=H**-0.5).requires_grad_()
    d1, d2 = s.randn(D, H, scale=D**-0.5).requires_grad_(), s.randn(H, D, scale=H**-0.5).requires_grad_()
    g = gates.clone().requires_grad_()
    act = lambda h: F.gelu(h, approximate="tanh")  # noqa: E731
    offs = torch.cumsum(counts, 0).to(torch.int32)
    fns = {
        "ours_fused": _fwd_bwd(lambda x, a, b, g: grouped_gemm_gated(act(grouped_gemm(x, a, counts, src_N=order, fan_in=K)),
                                                                     b, counts, g, order), [x, w1, w2, g]),
        "ours_grouped": _fwd_bwd(lambda x, a, b: grouped_gemm(act(grouped_gemm(x, a, counts)), b, counts), [x_N, w1, w2]),
        "torch_grouped_mm": _fwd_bwd(lambda x, a, b: torch._grouped_mm(act(torch._grouped_mm(x, a, offs)), b, offs), [x_N, w1, w2]),
        "dense_same_flops": _fwd_bwd(lambda x, a, b: act(x @ a) @ b, [x_N, d1, d2]),
    }
    ms = {}
    for name, fn in fns.items():
        try:
            ms[name] = s.time_ms(fn)
        except Exception as exc:  # torch._grouped_mm needs sm90 (and aligned strides) for bf16
            ms[name] = None
            rep.check(f"experts_{name}", ok=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    flops = 3 * 2 * 2 * N * D * H  # fwd + bwd (2x fwd) of two GEMMs
    dense = ms["dense_same_flops"]
    rep.check("mlp_expert_gemms_fwd_bwd", ok=True, shape=dict(T=T, D=D, E=E, H=H, K=K), ms=ms,
              tflops={k: (round(flops / v / 1e9, 1) if v else None) for k, v in ms.items()},
              fused_fraction_of_dense=(dense / ms["ours_fused"]) if dense and ms["ours_fused"] else None,
              grouped_fraction_of_dense=(dense / ms["ours_grouped"]) if dense and ms["ours_grouped"] else None,
              grouped_over_torch_grouped_mm=(ms["ours_grouped"] / ms["torch_grouped_mm"])
              if ms["ours_grouped"] and ms.get("torch_grouped_mm") else None, timing_is_meaningful=not s.smoke)


def _bench_moe_layer(rep: Report, s: Setup) -> None:
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoEMLP

    cfg = ModelConfig.from_preset("tiny") if s.smoke else ModelConfig.from_preset("molm-350m-4b")
    B, T = (2, 16) if s.smoke else (4, 2048)
    layer = MoEMLP(cfg).to(s.dev, s.dtype)
    dense = torch.nn.Sequential(torch.nn.Linear(cfg.d_model, cfg.ffd_hidden, bias=False), torch.nn.GELU("tanh"),
                                torch.nn.Linear(cfg.ffd_hidden, cfg.d_model, bias=False)).to(s.dev, s.dtype)
    x = s.randn(B, T, cfg.d_model).requires_grad_()
    x_kT = s.randn(cfg.k_mlp * B * T, cfg.d_model).requires_grad_()

    def ours():
        y, aux = layer(x)
        torch.autograd.grad(y.float().sum() + sum(aux.values()), [x, *layer.parameters()])

    def dense_step():
        torch.autograd.grad(dense(x_kT).float().sum(), [x_kT, *dense.parameters()])

    ms = {"moe_mlp_layer": s.time_ms(ours), "dense_mlp_k_times_tokens": s.time_ms(dense_step)}
    rep.check("moe_mlp_layer_fwd_bwd", ok=True, tokens=B * T, ms=ms,
              fraction_of_dense=ms["dense_mlp_k_times_tokens"] / ms["moe_mlp_layer"], target=">= 0.9",
              timing_is_meaningful=not s.smoke)


def _bench_stickbreaking(rep: Report, s: Setup) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from molm_ds.ops import stickbreaking_attention

    for label, (B, Hq, Hk, T, d) in (("heads16_d64", (1, 2, 2, 64, 16) if s.smoke else (4, 16, 16, 4096, 64)),
                                     ("molm_d1024", (1, 2, 1, 64, 32) if s.smoke else (1, 2, 1, 4096, 1024))):
        torch.manual_seed(0)
        q = s.randn(B, Hq, T, d).requires_grad_()
        k = s.randn(B, Hk, T, d).requires_grad_()
        v = s.randn(B, Hk, T, d).requires_grad_()
        c = math.sqrt(8.0 * math.sqrt(d))  # q.k / sqrt(d) ~ -8: the stick lasts past T keys, no tile is skipped
        ql, kl = q.detach().clone(), k.detach().clone()
        ql[..., 0], kl[..., 0] = c, -c
        ql.requires_grad_(), kl.requires_grad_()
        sb = lambda q, k, v: stickbreaking_attention(q, k, v)  # noqa: E731
        ms = {"ours_random": s.time_ms(_fwd_bwd(sb, [q, k, v])), "ours_long_stick": s.time_ms(_fwd_bwd(sb, [ql, kl, v]))}
        backend = None
        if Hq == Hk and d <= 256:
            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    ms["sdpa"] = s.time_ms(_fwd_bwd(sdpa, [q, k, v]))
                backend = "flash"
            except RuntimeError:  # no flash kernel here (the CPU): the default SDPA
                ms["sdpa"] = s.time_ms(_fwd_bwd(sdpa, [q, k, v]))
                backend = "default"
        causal_flops = 3.5 * 4 * B * Hq * T * T / 2 * d  # fwd 4*T^2/2*d per head, bwd 2.5x fwd (FlashAttention's count)
        rep.check(f"stickbreaking_fwd_bwd_{label}", ok=True, shape=[B, Hq, Hk, T, d], ms=ms, sdpa_backend=backend,
                  ours_over_sdpa_random=ms["ours_random"] / ms["sdpa"] if "sdpa" in ms else None,
                  ours_over_sdpa_long_stick=ms["ours_long_stick"] / ms["sdpa"] if "sdpa" in ms else None,
                  long_stick_causal_tflops=round(causal_flops / ms["ours_long_stick"] / 1e9, 1),
                  target="ours_over_sdpa_random <= 1.2" if "sdpa" in ms else None, timing_is_meaningful=not s.smoke)
        del q, k, v, ql, kl


# ---- part: train --------------------------------------------------------------------------------
def _write_shard(directory: Path, vocab: int, n_tokens: int, seed: int = 0) -> str:
    """A learnable synthetic stream (t -> (5t + 3) mod (vocab - 8), EOS between documents) with the
    manifest build_shards writes, so the trainer's checks accept it."""
    import hashlib

    import numpy as np

    from data_prep.indexed_writer import IndexedShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    doc_len = 4096
    cur = rng.integers(8, vocab, max(1, n_tokens // doc_len + 1)).astype(np.int64)  # one start per document
    cols = []
    for _ in range(doc_len - 1):  # every document advances one token at a time, all at once
        cols.append(cur.copy())
        cur = 8 + (5 * cur + 3) % (vocab - 8)
    body = np.stack(cols, axis=1)
    docs = [np.append(row, 2).astype(np.uint16) for row in body]
    w = IndexedShardWriter(str(directory / "part-00000"), np.uint16)
    w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    n_docs_written, n_written = w.finish()
    prefix = directory / "part-00000"
    manifest = {"format": 2, "dtype": "uint16", "documents": n_docs_written, "tokens": n_written,
                "tokenizer": {"vocab_size": vocab, "eos_id": 2, "bos_id": 1, "pad_id": 3, "unk_id": 0, "model_path": None,
                              "sha256": hashlib.sha256(f"synthetic tokenizer, vocab {vocab}".encode()).hexdigest()},
                "shards": [{"prefix": "part-00000", "docs": n_docs_written, "tokens": n_written,
                            "bin_bytes": os.path.getsize(str(prefix) + ".bin"), "idx_bytes": os.path.getsize(str(prefix) + ".idx")}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def train_layers(s: Setup, layers: int | None) -> int:
    """Blocks of the 350M-4B shape to train: 12 on an 80 GB card, the preset's 24 from 120 GiB up (H200)."""
    if layers:
        return layers
    if s.dev != "cuda":
        return 2
    return 24 if torch.cuda.get_device_properties(0).total_memory >= 120 * 2**30 else 12


def part_train(rep: Report, s: Setup, steps: int, layers: int | None, work: str) -> None:
    import runpy

    from molm_ds.train import load_job

    try:
        _train(rep, s, steps, train_layers(s, layers), work, load_job, runpy)
    finally:  # the run's process group, so the part's process ends cleanly
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(rep, s, steps, layers, work, load_job, runpy) -> None:
    job_file = REPO / "configs" / "gpu_check_350m.yaml"
    work_dir = Path(work)
    overrides = [f"run_dir={work_dir / 'run'}", f"training.steps={steps}"]
    if s.smoke:  # the same job (bf16 ZeRO-1 included) on the tiny model
        overrides += ["model.preset=tiny", "model.overrides={}", "data.seq_len=32", "training.micro_batch_size=2",
                      "training.warmup_steps=1", "monitor.log_interval=1"]
    else:
        overrides += [f"model.overrides={{n_layer: {layers}}}"]
    job = load_job(job_file, overrides)
    cfg, t = job.build_model_config(), job.training
    tokens_needed = (steps + 2) * t.micro_batch_size * t.grad_accum_steps * job.data.seq_len
    shard = _write_shard(work_dir / "data", cfg.vocab_size, int(tokens_needed / (1 - job.data.val_fraction)) + 8192)
    overrides.append(f"data.sources=[{{path: '{shard}'}}]")
    rep.set(job=str(job_file.relative_to(REPO)), overrides=overrides, n_layer=cfg.n_layer,
            total_params=cfg.total_params, active_params=cfg.active_params)
    if s.dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    main = runpy.run_path(str(REPO / "launch" / "pretrain.py"), run_name="gpu_check")["main"]
    t0 = time.time()
    rc = main(["--config", str(job_file)] + sum((["--set", o] for o in overrides), []))
    seconds = time.time() - t0
    rows = [json.loads(line) for line in open(work_dir / "run" / "metrics.jsonl") if line.strip()]
    train_rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in train_rows if r["step"] > min(5, steps // 2)] or [r["tokens_per_s"] for r in train_rows]
    last = train_rows[-1]["step"] if train_rows else 0
    tps = statistics.median(steady)
    fpt = cfg.flops_per_token(job.data.seq_len)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if s.dev == "cuda" else None
    rep.check("train", ok=rc == 0 and last == steps and all(math.isfinite(r["loss"]) for r in train_rows),
              steps=last, layers=layers, seq_len=job.data.seq_len, tokens_per_step=t.micro_batch_size * job.data.seq_len,
              tokens_per_s=tps, flops_per_token=fpt, mfu_vs_datasheet=tps * fpt / HOPPER_BF16_DATASHEET if not s.smoke else None,
              achieved_tflops=tps * fpt / 1e12, peak_memory_gib=peak_mem, first_loss=train_rows[0]["loss"],
              last_loss=train_rows[-1]["loss"], wall_seconds=round(seconds, 1), timing_is_meaningful=not s.smoke)


# ---- mark / merge -------------------------------------------------------------------------------
def mark(path: str, part: str, rc: int, seconds: float) -> None:
    """After a part's process ended: its exit status, and a status for a part that wrote nothing or was killed."""
    data = json.load(open(path)) if os.path.exists(path) else {"part": part, "checks": {}}
    data.update(rc=rc, wall_seconds=seconds)
    if rc == 125:  # the shell script's code for "not started: the budget was spent"
        data["status"] = "skipped"
    elif rc in (124, 137):
        data["status"] = "timeout"
    elif rc != 0 and data.get("status") in (None, "running", "ok"):
        data["status"] = "crashed"
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _get(parts, part, check, key):
    return parts.get(part, {}).get("checks", {}).get(check, {}).get(key)


def merge(parts_dir: str, out: str, selected: list | None = None) -> dict:
    """Every part's file (a selected part without one is "missing", an unselected one "not selected") and
    the summary against the targets, written atomically: the shell script calls this after every part."""
    selected = list(PARTS) if selected is None else selected
    parts = {}
    for name in PARTS:
        p = Path(parts_dir) / f"{name}.json"
        if p.exists():
            parts[name] = json.load(open(p))
        else:
            parts[name] = {"part": name, "status": "missing" if name in selected else "not selected"}
    sb = "stickbreaking_fwd_bwd_heads16_d64"
    no_hang = _get(parts, "hang", "hang_shape", "ok")
    if parts["hang"].get("status") == "timeout":  # killed at its limit: a hang, or runs far too slow
        no_hang = False
    targets = {
        "stickbreaking_fwd_bwd_over_sdpa_flash_T4096_random": (_get(parts, "bench", sb, "ours_over_sdpa_random"), "<= 1.2"),
        "no_hang_in_50_runs": (no_hang, "true"),
        "moe_mlp_layer_fraction_of_dense": (_get(parts, "bench", "moe_mlp_layer_fwd_bwd", "fraction_of_dense"), ">= 0.9"),
        "training_mfu": (_get(parts, "train", "train", "mfu_vs_datasheet"), f">= {MFU_TARGET}"),
    }

    def met(value, target):
        if value is None or isinstance(value, str):
            return None
        if target == "true":
            return bool(value)
        op, bound = target.split()
        return value <= float(bound) if op == "<=" else value >= float(bound)

    smoke = any(p.get("smoke") for p in parts.values())
    summary = {
        "device": parts["env"].get("device"), "smoke": smoke,
        "status": {n: p.get("status") for n, p in parts.items()},
        "kernels_failed": parts["kernels"].get("failed"),
        "targets": {k: {"value": v, "target": t, "met": None if smoke else met(v, t)} for k, (v, t) in targets.items()},
    }
    result = {"summary": summary, "parts": parts}
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(summary, indent=1))
    return result


def main(argv=None) -> int:
    from molm_ds import cli  # the checkout's (REPO is on sys.path): the project's one-line argument errors

    p = cli.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*PARTS, "mark", "merge"])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (Triton under the interpreter)")
    p.add_argument("--runs", type=int, default=None, help="hang: runs (50; smoke 3)")
    p.add_argument("--steps", type=int, default=None, help="train: optimizer steps (30; smoke 3)")
    p.add_argument("--layers", type=int, default=None,
                   help="train: transformer blocks of the 350M-4B shape (default 12, or the preset's 24 on a card of 120 GiB or more)")
    p.add_argument("--warm", action="store_true", help="kernels/hang/bench: launch each kernel once, compare and time nothing")
    p.add_argument("--groups", default=",".join(KERNEL_GROUPS), help="kernels: which check groups (comma-separated)")
    p.add_argument("--work", default=None, help="train: directory for the shard and the run (default: a temp dir)")
    p.add_argument("--parts", help="merge: directory of part files")
    p.add_argument("--selected", default=" ".join(PARTS), help="merge: the parts this run was asked for (GPU_CHECK_PARTS)")
    p.add_argument("--name", help="mark: part name")
    p.add_argument("--rc", type=int, default=0, help="mark: exit status")
    p.add_argument("--seconds", type=float, default=0.0, help="mark: wall seconds")
    a = p.parse_args(argv)
    if a.part == "mark":
        mark(a.out, a.name, a.rc, a.seconds)
        return 0
    if a.part == "merge":
        merge(a.parts, a.out, a.selected.split())
        return 0
    _import_torch()
    s = Setup(a.cpu_smoke, warm=a.warm)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU smoke run", file=sys.stderr)
        return 2
    rep = Report(a.out, a.part, a.cpu_smoke)
    print(f"== gpu_check {a.part}{' (cpu smoke)' if a.cpu_smoke else ''}", flush=True)
    if a.part == "env":
        with rep.trying("ceilings"):
            part_env(rep, s)
    elif a.part == "pytest":
        part_pytest(rep, s)
    elif a.part == "warm":
        part_warm(rep, s)
    elif a.part == "kernels":
        part_kernels(rep, s, tuple(g for g in a.groups.split(",") if g))
    elif a.part == "hang":
        with rep.trying("hang_shape"):
            part_hang(rep, s, a.runs or (3 if a.cpu_smoke else 50))
    elif a.part == "bench":
        part_bench(rep, s)
    elif a.part == "train":
        import tempfile

        with rep.trying("train"):
            part_train(rep, s, a.steps or (3 if a.cpu_smoke else 30), a.layers, a.work or tempfile.mkdtemp(prefix="gpu_check_train_"))
    rep.done()
    return 0 if rep.data["status"] == "ok" else 1


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)  # exits without the interpreter's teardown (about 1 s of CPU for a process that imported torch)
