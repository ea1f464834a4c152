"""Grow 4 -> 6 experts per sub-layer at ep_size 2: a 2-rank gloo job launched with
`deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu). Rank 0 holds global experts 0-2 (all old), rank 1 holds
3-5 (old 3, new 4, 5): the per-rank gradient masks must keep every old expert bit for bit, and the
checkpoint must hold one file per global expert, loadable in one process."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from molm_ds.continual import grow_experts
from molm_ds.jobs import run as run_job
from molm_ds.checkpoint import list_expert_files, load_model
from molm_ds.train import load_job
from molm_ds.train import loop
from molm_ds.testing import REPO, TINY_JOB, tiny_job_overrides, write_shard

pytestmark = pytest.mark.slow
FAST = ["training.grad_accum_steps=1", "training.eval_interval=0", "checkpoint.interval=0", "data.eval_batches=1",
        "monitor.tensorboard=false"]


def test_grow_4_to_6_at_ep_size_2(tmp_path):
    old, new = write_shard(tmp_path / "old", seed=0, n_docs=30), write_shard(tmp_path / "new", seed=1, n_docs=30)
    run_job(load_job(TINY_JOB, tiny_job_overrides(old, tmp_path / "pre") + FAST + ["training.steps=1"]))
    start = load_model(str(tmp_path / "pre" / "checkpoints"))
    job = load_job(TINY_JOB, tiny_job_overrides(new, tmp_path / "cl") + FAST + [
        f"init_from={tmp_path / 'pre' / 'checkpoints'}", "parallel.ep_size=2", "training.steps=2",
        f"continual={{attention: 2, mlp: 2, strategy: new_only, router_reg_weight: 0.01, "
        f"eval: {{old: ['{old}'], new: ['{new}']}}}}"])
    path = tmp_path / "job.yaml"
    path.write_text(job.to_yaml())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = subprocess.run([ds, "--num_gpus", "2", "--master_port", "29631", "launch/pretrain.py", "--config", str(path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt_dir = tmp_path / "cl" / "checkpoints"
    files = list_expert_files(str(ckpt_dir), "step_00000002")
    assert sorted(files) == [(L, e) for L in range(4) for e in range(6)]
    end = load_model(str(ckpt_dir))  # written at ep_size 2, read in one process
    assert (end.config.n_att_experts, end.config.n_mlp_experts) == (6, 6)
    s0, s1 = start.state_dict(), end.state_dict()
    for k, v in s0.items():
        if ".experts." in k or k.endswith("w_gate"):
            assert torch.equal(s1[k][:4], v), k  # old experts (on both ranks) and old router rows
            assert s1[k].shape[0] == 6
        else:
            assert torch.equal(s1[k], v), k
    init = grow_experts(load_model(str(tmp_path / "pre" / "checkpoints")), attention=2, mlp=2,
                        seed=job.training.seed).state_dict()
    trained = [k for k in s0 if ".experts." in k and not torch.equal(init[k][4:], s1[k][4:])]
    assert trained  # some new experts (all on rank 1) got tokens and moved
    for k in s0:  # every A' moves (its L2 penalty has a gradient everywhere)
        if k.endswith("w_gate"):
            assert not torch.equal(init[k][4:], s1[k][4:]), k
    report = yaml.safe_load((tmp_path / "cl" / "continual_report.json").read_text())
    assert set(report["after"]) >= {"old_val_ppl", "new_val_ppl", "old_new_mass_mlp", "new_new_topk_attn"}
