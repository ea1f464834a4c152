"""The training loop in one process (a one-rank gloo group): ZeRO stages, exact resume, non-finite
steps, config errors before any work. Multi-rank launches are in tests/launch."""

import glob
import math
import os
import subprocess
import sys

import pytest
import torch

from molm_ds import checkpoint as ckpt
from molm_ds.train import load_job
from molm_ds.train import loop, step
from molm_ds.train.recipe import Recipe
from molm_ds.testing import REPO, TINY_JOB, read_metrics, tiny_job_overrides, write_ds_config

pytestmark = pytest.mark.slow


def run(shard, run_dir, *overrides):
    job = load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + list(overrides))
    return loop.train(job)


def weights(ckpt_dir, tag):
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt_dir, tag, "*model_states.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)  # expert files hold a plain state dict
        out.update({f"{os.path.basename(f)}:{k}": v for k, v in sd.items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero1_fp32", "zero2_fp32", "zero1_bf16"])
def test_zero_stages_train(shard, tmp_path, ds):
    s = run(shard, tmp_path, f"deepspeed.config=ds_configs/{ds}.json", "training.steps=3")
    rows = read_metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    for r in rows.values():
        for key in ("loss", "lm_loss", "mi", "load_concentration", "switch", "z", "lr", "tokens_per_s"):
            assert math.isfinite(r[key]), (key, r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["mi"], rel=1e-5)
    assert "val_loss" in rows[2] and "val_loss" in rows[3] and "val_loss" not in rows[1]
    assert rows[2]["val_ppl"] == pytest.approx(math.exp(rows[2]["val_loss"]))
    assert s["last_checkpoint"] == "step_00000003" and ckpt.is_complete(s["checkpoint_dir"], "step_00000003")
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "*", "events.out.tfevents.*"))


@pytest.mark.slow  # the first use JIT-builds DeepSpeed's cpu_adam op (about a minute)
@pytest.mark.parametrize("dtype,rel", [("fp32", 1e-6), ("bf16", 1e-3)])
def test_optimizer_offload_matches_zero2(shard, tmp_path, dtype, rel):
    """ZeRO-2 with the optimizer offloaded to DeepSpeedCPUAdam trains like plain ZeRO-2 (torch AdamW) on the
    same job: same losses and gradient norms step by step, and a complete checkpoint."""
    rows = {}
    for ds in (f"zero2_offload_{dtype}", f"zero2_{dtype}"):
        s = run(shard, tmp_path / ds, f"deepspeed.config=ds_configs/{ds}.json", "training.steps=3")
        assert ckpt.is_complete(s["checkpoint_dir"], "step_00000003")
        rows[ds] = read_metrics(tmp_path / ds)
    off, ref = rows[f"zero2_offload_{dtype}"], rows[f"zero2_{dtype}"]
    assert sorted(off) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert off[step][key] == pytest.approx(ref[step][key], rel=rel), (step, key)
    assert off[3]["loss"] < off[1]["loss"]


def test_the_cpu_adam_build_script_readies_the_op_offload_loads():
    """scripts/build_cpu_adam.py (`make test` runs it in the background while the venv installs): the op the
    offload tests load, built or found in torch's extension cache."""
    p = subprocess.run([sys.executable, "scripts/build_cpu_adam.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0 and "cpu_adam ready after" in p.stdout, (p.stdout + p.stderr)[-3000:]
    # a flag it does not take: the project's one error line, before any build
    p = subprocess.run([sys.executable, "scripts/build_cpu_adam.py", "--jobs", "4"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr


def test_loss_falls_on_learnable_data(shard, tmp_path):
    run(shard, tmp_path, "training.steps=12", "training.grad_accum_steps=1", "training.lr=3e-2",
        "training.micro_batch_size=4", "training.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.save_final=false")
    rows = read_metrics(tmp_path)
    first = sum(rows[s]["lm_loss"] for s in (1, 2)) / 2
    last = sum(rows[s]["lm_loss"] for s in (11, 12)) / 2
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("ds", ["zero2_fp32", "zero1_bf16"])
def test_resume_is_bit_identical(shard, tmp_path, ds):
    """2N steps in one go vs N steps, then resume and N more (sample_topk makes the RNG matter); bf16
    restores its fp32 master weights and optimizer state from the checkpoint too."""
    extra = ["model.overrides={sample_topk: 1}", f"deepspeed.config=ds_configs/{ds}.json"]
    a = run(shard, tmp_path / "a", "training.steps=4", "checkpoint.interval=2", *extra)
    b = run(shard, tmp_path / "b", "training.steps=4", f"resume={a['checkpoint_dir']}/step_00000002", *extra)
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert sorted(rb) == [3, 4]
    for s in (3, 4):
        for key in ("loss", "lm_loss", "mi", "switch", "z", "grad_norm", "lr"):
            assert rb[s][key] == ra[s][key], (s, key)
    assert rb[4]["val_loss"] == ra[4]["val_loss"]
    wa, wb = weights(a["checkpoint_dir"], "step_00000004"), weights(b["checkpoint_dir"], "step_00000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # resume: auto in a's directory is a no-op (already at the last step) and says so by not training
    c = run(shard, tmp_path / "a", "training.steps=4", "resume=auto", *extra)
    assert c["step"] == 4


def test_partial_and_missing_checkpoints_are_errors(shard, tmp_path):
    a = run(shard, tmp_path / "a", "training.steps=2", "checkpoint.interval=1", "training.eval_interval=0")
    os.remove(os.path.join(a["checkpoint_dir"], "step_00000002", ckpt.COMPLETE))
    with pytest.raises(ckpt.CheckpointError, match="partial"):
        run(shard, tmp_path / "b", f"resume={a['checkpoint_dir']}/step_00000002")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        run(shard, tmp_path / "b", f"resume={tmp_path}/nowhere")
    # auto picks the newest complete tag, skipping the partial one
    assert ckpt.resolve_resume("auto", a["checkpoint_dir"]) == (a["checkpoint_dir"], "step_00000001")


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero2_fp32", "zero0_bf16"])
def test_nonfinite_step_is_skipped_and_counted(shard, tmp_path, monkeypatch, ds):
    """A NaN loss on step 2 skips that step (weights unchanged), counts it, and writes no checkpoint of
    the non-finite state; step 3 trains and saves again."""
    real, calls = step.total_loss, []

    def nan_on_step_2(**kw):  # 2 micro-batches per step: calls 3 and 4 belong to step 2
        calls.append(1)
        out = real(**kw)
        return out * float("nan") if len(calls) == 3 else out

    real_step, snapshots = loop.train_step, []

    def snapshot_then_step(engine, *args, **kwargs):  # weights as each step begins
        snapshots.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
        return real_step(engine, *args, **kwargs)

    monkeypatch.setattr(step, "total_loss", nan_on_step_2)
    monkeypatch.setattr(loop, "train_step", snapshot_then_step)
    run(shard, tmp_path, "training.steps=3", "checkpoint.interval=1", "training.eval_interval=0",
        f"deepspeed.config=ds_configs/{ds}.json")
    rows = read_metrics(tmp_path)
    assert rows[1]["skipped_steps"] == 0 and rows[2]["skipped_steps"] == 1 and "loss" not in rows[2]
    assert math.isfinite(rows[3]["loss"])
    after1, after2 = snapshots[1], snapshots[2]
    assert all(torch.equal(after1[k], after2[k]) for k in after1), "a skipped step must not change the weights"
    d = os.path.join(tmp_path, "checkpoints")
    assert ckpt.list_tags(d) == ["step_00000001", "step_00000003"], "no checkpoint of a non-finite streak"
    w3 = weights(d, ckpt.tag_for(3))
    assert all(torch.isfinite(v).all() for v in w3.values())
    assert any(not torch.equal(v, after2[k.split(":", 1)[1]]) for k, v in w3.items()
               if k.startswith("mp_rank") and k.split(":", 1)[1] in after2), "step 3 must train"


def test_too_many_nonfinite_steps_stop_the_run(shard, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "total_loss", lambda **kw: kw["lm"] * float("inf"))
    with pytest.raises(loop.NonFiniteLossError, match="2 non-finite steps in a row"):
        run(shard, tmp_path, "training.steps=5", "training.max_nonfinite_in_a_row=2", "training.eval_interval=0")


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.ep_size=2"], "does not divide the world size 1"),
    (["resume=/definitely/not/here"], "does not exist"),
    (["model.overrides={vocab_size: 100}"], "vocab_size >= "),
])
def test_config_errors_fail_before_any_work(shard, tmp_path, monkeypatch, overrides, needle):
    def no_model(self):
        raise AssertionError("the model was built before the config error")

    monkeypatch.setattr(Recipe, "build_model", no_model)
    with pytest.raises((ValueError, ckpt.CheckpointError), match=needle):
        run(shard, tmp_path, *overrides)


def test_batch_keys_disagreeing_fail_before_any_work(shard, tmp_path, monkeypatch):
    monkeypatch.setattr(Recipe, "build_model", lambda self: pytest.fail("model built"))
    bad = write_ds_config(tmp_path / "ds.json", gradient_accumulation_steps=8)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=8 disagrees"):
        run(shard, tmp_path, f"deepspeed.config={bad}")
