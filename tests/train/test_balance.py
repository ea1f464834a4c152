"""Aux-loss-free balancing in the trainer: one update per optimizer step from the counts of every micro-batch
and every rank (2 and 4 gloo ranks = one process), exact resume, the bias in the checkpoint."""

from __future__ import annotations

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds import checkpoint as ckpt
from molm_ds.train import load_job, loop
from molm_ds.train.balance import bias_routers, update_router_biases
from molm_ds.testing import run_ranks
from tests.train._balance_workers import bias_step_worker
from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides

BIAS = "model.overrides={router_balance: bias, router_bias_rate: 0.01}"


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_one_process(world):
    torch.manual_seed(3)
    model = MoLM(ModelConfig.from_preset("tiny", router_balance="bias", router_bias_rate=0.01))
    ids = torch.randint(0, 512, (3, 4, 16))  # 3 steps of a global batch of 4 sequences
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the updates below work in place
    model.train()
    for s in range(3):
        model(ids[s])
        update_router_biases(model)
    want = [r.expert_bias_E for r in bias_routers(model)]
    assert any(float(w.abs().sum()) > 0 for w in want)
    for got in run_ranks(bias_step_worker, world, args=(state, ids, 3)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def _run(shard, run_dir, *overrides):
    return loop.train(load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [BIAS, *overrides]))


def _biases(ckpt_dir, tag):
    sd = ckpt.read_model_state(ckpt_dir, tag)
    return {k: v for k, v in sd.items() if k.endswith("expert_bias_E")}


@pytest.mark.slow
def test_trainer_accumulation_and_resume(shard, tmp_path):
    """1 x 4 micro-batches = 4 x 1 after a step; 4 steps = 2 steps + resume + 2 steps, bit for bit (bf16: the
    bias stays fp32 in the checkpoint)."""
    one = _run(shard, tmp_path / "m4", "training.steps=1", "training.micro_batch_size=4", "training.grad_accum_steps=1",
               "training.eval_interval=0")
    four = _run(shard, tmp_path / "m1", "training.steps=1", "training.micro_batch_size=1", "training.grad_accum_steps=4",
                "training.eval_interval=0")
    b1, b4 = _biases(one["checkpoint_dir"], "step_00000001"), _biases(four["checkpoint_dir"], "step_00000001")
    assert len(b1) == 4 and b1.keys() == b4.keys()
    assert all(torch.equal(b1[k], b4[k]) for k in b1)
    assert all(b.abs().max() == pytest.approx(0.01) for b in b1.values())  # one step of 0.01 moved each

    extra = ["deepspeed.config=ds_configs/zero1_bf16.json", "training.steps=4", "checkpoint.interval=2"]
    a = _run(shard, tmp_path / "a", *extra)
    b = _run(shard, tmp_path / "b", *extra, f"resume={a['checkpoint_dir']}/step_00000002")
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for s in (3, 4):
        assert rb[s]["loss"] == ra[s]["loss"] and rb[s]["grad_norm"] == ra[s]["grad_norm"], s
    ba, bb = _biases(a["checkpoint_dir"], "step_00000004"), _biases(b["checkpoint_dir"], "step_00000004")
    assert all(v.dtype == torch.float32 for v in ba.values())
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    mid = _biases(a["checkpoint_dir"], "step_00000002")
    assert any(not torch.equal(ba[k], mid[k]) for k in ba)

    # monitoring: the bias per expert and the load per sub-layer in metrics.jsonl and TensorBoard
    from molm_ds.testing import scalars

    last = ra[4]
    assert [last[f"balance/L01/mlp/bias/e{e:03d}"] for e in range(4)] == ba["blocks.1.mlpf.router.expert_bias_E"].tolist()
    assert last["balance/L00/attn/load_max_mean"] >= 1.0 and "balance/L00/attn/load_cv" in last
    tb = scalars(str(tmp_path / "a" / "tensorboard"))
    assert tb["train/balance/L01/mlp/bias_spread"][4] == pytest.approx(last["balance/L01/mlp/bias_spread"])


@pytest.mark.slow
@pytest.mark.distributed
def test_elastic_resume_carries_the_bias(shard, tmp_path):
    """2 ranks (ep_size 2) save at step 2; one rank resumes (the elastic path): the bias it starts from is the
    saved one, and after step 4 it equals the uninterrupted 2-rank run's (global batch 8 in both)."""
    from tests.train._elastic_workers import train_recording

    def job(run_dir, world, ep, *extra):
        return tiny_job_overrides(shard, run_dir) + [
            BIAS, "training.steps=4", f"training.grad_accum_steps={8 // (2 * world)}", "training.eval_interval=0",
            "checkpoint.interval=2", f"parallel.ep_size={ep}", "monitor.tensorboard=false", *extra]

    run_ranks(train_recording, 2, args=(job(tmp_path / "a", 2, 2),))
    ck = str(tmp_path / "a" / "checkpoints")
    loop.train(load_job(TINY_JOB, job(tmp_path / "b", 1, 1, f"resume={ck}/step_00000002")))
    ba, bb = _biases(ck, "step_00000004"), _biases(str(tmp_path / "b" / "checkpoints"), "step_00000004")
    assert len(ba) == 4 and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert any(float(v.abs().sum()) > 0 for v in ba.values())
