"""Continual jobs through the trainer in one process (one-rank gloo): frozen parameters bit-identical,
old/new-domain perplexity before/after in metrics and report, exact resume, stage after stage, offline
checkpoint surgery, bad init_from before any work."""

import json
import os

import pytest
import torch

from molm_ds.continual import grow_checkpoint, grow_experts
from molm_ds.errors import CheckpointError
from molm_ds.jobs import run as run_job
from molm_ds.checkpoint import list_expert_files, load_model
from molm_ds.train import load_job
from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides, write_shard

pytestmark = pytest.mark.slow
FAST = ["training.grad_accum_steps=1", "training.eval_interval=0", "checkpoint.interval=0", "training.warmup_steps=0",
        "data.eval_batches=1", "monitor.tensorboard=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cl")
    old = write_shard(root / "old", seed=0, n_docs=40)
    new = write_shard(root / "new", seed=1, n_docs=40)
    run_job(load_job(TINY_JOB, tiny_job_overrides(old, root / "pre") + FAST + ["training.steps=2"]))
    return {"old": old, "new": new, "ckpt": str(root / "pre" / "checkpoints"), "root": root}


def continual_job(w, run_dir, *extra, strategy="new_only"):
    cl = (f"continual={{attention: 2, mlp: 2, strategy: {strategy}, router_reg_weight: 0.01, distill_weight: 0.5, "
          f"eval: {{old: ['{w['old']}'], new: ['{w['new']}']}}}}")
    return load_job(TINY_JOB, tiny_job_overrides(w["new"], run_dir) + FAST +
                    [f"init_from={w['ckpt']}", cl, "training.steps=3", *extra])


@pytest.mark.parametrize("strategy, ds", [("new_only", "zero1_fp32"), ("full_router", "zero2_fp32"),
                                          ("new_only", "zero0_fp32")])
def test_frozen_parameters_bit_identical_and_report(world, tmp_path, strategy, ds):
    s = run_job(continual_job(world, tmp_path, f"deepspeed.config=ds_configs/{ds}.json", strategy=strategy))
    start = load_model(world["ckpt"]).state_dict()
    end = load_model(os.path.join(s["checkpoint_dir"], s["last_checkpoint"])).state_dict()
    assert len(list_expert_files(s["checkpoint_dir"], s["last_checkpoint"])) == 4 * 6  # new per-expert files
    for k, old in start.items():
        new = end[k]
        E = old.shape[0]
        if ".experts." in k:
            assert torch.equal(new[:E], old) and not torch.equal(new[E:], torch.zeros_like(new[E:])), k
        elif k.endswith("router.w_gate"):
            if strategy == "new_only":
                assert torch.equal(new[:E], old), k
            assert not torch.equal(new[E:], grow_experts_rows(world, k)), k  # A' trained
        elif ".router." in k and strategy == "full_router":
            assert not torch.equal(new, old), k
        else:
            assert torch.equal(new, old), k
    rows = read_metrics(tmp_path)
    assert {"old_val_ppl", "new_val_ppl"} <= set(rows[0]) and {"old_val_ppl", "new_val_ppl"} <= set(rows[3])
    assert rows[1]["router_reg"] > 0 and rows[1]["distill_kl"] >= 0
    report = json.load(open(tmp_path / "continual_report.json"))
    assert report["before"]["new_val_loss"] == rows[0]["new_val_loss"]
    assert report["after"]["old_val_loss"] == rows[3]["old_val_loss"] and report["strategy"] == strategy
    shares = {f"{d}_new_{m}_{k}" for d in ("old", "new") for m in ("mass", "topk") for k in ("attn", "mlp")}
    assert shares <= set(rows[0]) and shares <= set(rows[3]) and shares <= set(report["after"])
    assert all(0 < rows[3][k] < 1 for k in shares if "_mass_" in k)
    assert report["knobs"]["router_reg_weight"] == 0.01 and report["knobs"]["strategy"] == strategy
    md = (tmp_path / "continual_report.md").read_text()
    assert "| new |" in md and "A' regulariser weight 0.01" in md


def grow_experts_rows(world, key):
    """A' right after insertion (same seed as the job: training.seed of the tiny job)."""
    m = grow_experts(load_model(world["ckpt"]), attention=2, mlp=2, seed=load_job(TINY_JOB).training.seed)
    return m.state_dict()[key][4:]


def _weights(d):
    return load_model(d).state_dict()


def test_continual_job_resumes_exactly(world, tmp_path):
    """4 steps in one go vs 2 steps, then resume (into another run_dir) and 2 more."""
    a = run_job(continual_job(world, tmp_path / "a", "training.steps=4", "checkpoint.interval=2"))
    b = run_job(continual_job(world, tmp_path / "b", "training.steps=4",
                                 f"resume={a['checkpoint_dir']}/step_00000002"))
    wa = _weights(os.path.join(a["checkpoint_dir"], "step_00000004"))
    wb = _weights(os.path.join(b["checkpoint_dir"], "step_00000004"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert sorted(ra) == [0, 1, 2, 3, 4] and sorted(rb) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "lm_loss", "grad_norm", "router_reg", "distill_kl"):
            assert ra[step][key] == rb[step][key], (step, key)
    assert ra[4]["old_val_loss"] == rb[4]["old_val_loss"] and ra[4]["new_val_loss"] == rb[4]["new_val_loss"]
    report = json.load(open(tmp_path / "b" / "continual_report.json"))
    assert report["before"]["old_val_loss"] == ra[0]["old_val_loss"]  # carried over from the first run


def test_stage_after_stage_and_offline_surgery(world, tmp_path):
    s1 = run_job(continual_job(world, tmp_path / "s1", "training.steps=1"))
    stage1 = os.path.join(s1["checkpoint_dir"], s1["last_checkpoint"])
    job2 = load_job(TINY_JOB, tiny_job_overrides(world["new"], tmp_path / "s2") + FAST + [
        f"init_from={stage1}", "model.overrides={n_att_experts: 6, n_mlp_experts: 6}",
        "continual={mlp: 2, strategy: full_router}", "training.steps=1"])
    s2 = run_job(job2)
    m2 = load_model(os.path.join(s2["checkpoint_dir"], s2["last_checkpoint"]))
    assert (m2.config.n_att_experts, m2.config.n_mlp_experts) == (6, 8)
    assert torch.equal(m2.blocks[1].mlpf.experts.w2[:6], load_model(stage1).blocks[1].mlpf.experts.w2)
    # offline: same surgery on the checkpoint files as on the loaded model
    d = grow_checkpoint(world["ckpt"], str(tmp_path / "grown"), attention=2, mlp=4, seed=3)
    on_files = load_model(d).state_dict()
    in_memory = grow_experts(load_model(world["ckpt"]), attention=2, mlp=4, seed=3).state_dict()
    assert len(list_expert_files(str(tmp_path / "grown"), os.path.basename(d))) == 2 * 6 + 2 * 8
    for k in in_memory:
        assert torch.equal(on_files[k], in_memory[k]), k


def test_bad_init_from_fails_before_any_work(world, tmp_path):
    bad_path = continual_job(world, tmp_path / "r1", "init_from=" + str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="does not exist"):
        run_job(bad_path)
    wrong_model = continual_job(world, tmp_path / "r2", "model.overrides={n_mlp_experts: 6}")
    with pytest.raises(CheckpointError, match=r"holds a different model.*n_mlp_experts.: 4"):
        run_job(wrong_model)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
