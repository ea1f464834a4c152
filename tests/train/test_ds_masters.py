"""fp32 master weights of bf16 runs (checkpoint.read_fp32_state): read back from the topology-free
optimizer state, or from DeepSpeed's optimizer shards (molm_ds.checkpoint.ds_masters) when a checkpoint has
none, they equal the engine's own fp32 params exactly, for ZeRO 0, 1 and 2,
expert-parallel (ep 2: experts stacked back by global id) and expert-data-parallel (ep 1 on 2 ranks:
every expert group partitioned over both ranks)."""

from __future__ import annotations


import pytest
import torch

from molm_ds.testing import tiny_job_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _run(shard, run_dir, ds_config: str, ep_size: int, elastic: bool):
    from molm_ds.testing import run_ranks

    from tests.train._masters_workers import train_and_capture

    overrides = tiny_job_overrides(shard, run_dir) + [
        "training.steps=2", "training.eval_interval=0", "checkpoint.interval=0", "monitor.tensorboard=false",
        f"parallel.ep_size={ep_size}", f"deepspeed.config=ds_configs/{ds_config}.json", f"checkpoint.elastic={elastic}"]
    return run_ranks(train_and_capture, world_size=2, args=(overrides,))


def _engine_masters(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The full fp32 state from each rank's view: dense params from rank 0, experts stacked by ep position."""
    ep = ranks[0]["ep_size"]
    out = {}
    for name, t in ranks[0]["masters"].items():
        if ".experts." in name and ep > 1:
            out[name] = torch.cat([ranks[e]["masters"][name] for e in range(ep)])  # rank e = ep position e here
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("ds_config,ep_size,elastic", [("zero0_bf16", 2, True), ("zero1_bf16", 1, True),
                                                       ("zero2_bf16", 2, True), ("zero2_bf16", 2, False),
                                                       ("zero1_bf16", 1, False)])
def test_fp32_masters_equal_the_engines(shard, tmp_path, ds_config, ep_size, elastic):
    from molm_ds import checkpoint as ckpt

    want = _engine_masters(_run(shard, tmp_path, ds_config, ep_size, elastic))
    d, tag = ckpt.resolve(str(tmp_path / "checkpoints"))
    low = ckpt.read_model_state(d, tag)
    got = ckpt.read_fp32_state(d, tag)
    assert set(want) <= set(got)
    differ = 0
    for name, w in want.items():
        assert low[name].dtype == torch.bfloat16
        assert got[name].dtype == torch.float32 and got[name].shape == w.shape, name
        assert torch.equal(got[name], w.float()), name
        differ += not torch.equal(low[name].float(), w.float())
    assert differ > len(want) // 2, "the masters should carry more precision than the saved bf16 weights"
    model = ckpt.load_fp32_model(str(tmp_path / "checkpoints"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name].float()), name
    # what a user exports is the masters too (launch/export.py --consolidated)
    import importlib.util

    from safetensors.torch import load_file

    from molm_ds.testing import REPO

    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    out = tmp_path / "fp32.safetensors"
    assert export.main(["--checkpoint", str(tmp_path / "checkpoints"), "--consolidated", str(out)]) == 0
    flat = load_file(str(out))
    for name, w in want.items():
        assert torch.equal(flat[name], w.float()), name
