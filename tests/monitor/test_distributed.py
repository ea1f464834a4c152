"""2 gloo ranks, each with half the batch, write the same expert-load events as one process on the
whole batch; DeepSpeed's monitor (the ds_config `tensorboard` block) writes the scalars on rank 0."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from molm_ds.testing import event_dirs, scalars
from molm_ds.testing import load_events as load

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 2
B, T = 4, 12


def _batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 512, (B, T), generator=g) for _ in range(STEPS)]


def _train(model, mon, vocab, shard_of, brute=None):
    import torch.nn.functional as F

    for step, ids in enumerate(_batches(), start=1):
        shard = shard_of(ids)
        logits = model(shard).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), shard[:, 1:].reshape(-1))
        loss.backward()
        if brute is not None:  # brute force: bincount of the routing, per step
            for i, blk in enumerate(model.blocks):
                for kind, m in (("attn", blk.attn), ("mlp", blk.mlpf)):
                    idx = m.last_routing.idx_TK
                    brute[(step, i, kind)] = torch.bincount(idx[idx >= 0], minlength=m.num_experts)
        mon.on_step(step, {"loss": loss.item(), "lr": 1e-3 * step, "tokens_per_s": 1000.0, "skipped_steps": 0})
    mon.close()


def _worker(rank, world, init_file, out_dir):
    """Every rank trains on its half of each batch, monitored through DeepSpeed's monitor; then rank 0
    alone (a one-rank group) runs the same model on the whole batches as the single-process reference."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import deepspeed
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.monitor import MonitorConfig, TrainingMonitor

    from molm_ds.parallel.groups import skip_cpu_shm_comm

    skip_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    two = os.path.join(out_dir, "two_ranks")
    ds_monitor = MonitorMaster(get_monitor_config({"tensorboard": {"enabled": True, "output_path": two, "job_name": "job"}}))
    cfg = ModelConfig.from_preset("tiny")
    mcfg = MonitorConfig(histogram_every=1, heatmap_every=2, peak_flops=1e9)

    torch.manual_seed(0)
    model = MoLM(cfg).train()
    mon = TrainingMonitor(model, config=mcfg, run_dir=two, ds_monitor=ds_monitor, flops_per_token=cfg.flops_per_token(T))
    _train(model, mon, cfg.vocab_size, lambda ids: ids.chunk(world)[rank])

    solo = dist.new_group([0])
    if rank == 0:
        torch.manual_seed(0)
        model = MoLM(cfg).train()
        single = os.path.join(out_dir, "single")
        mon = TrainingMonitor(model, config=mcfg, run_dir=single, group=solo,
                              flops_per_token=cfg.flops_per_token(T))
        brute = {}
        _train(model, mon, cfg.vocab_size, lambda ids: ids, brute)
        torch.save({"counts": brute}, os.path.join(single, "brute.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return str(tmp / "single"), str(tmp / "two_ranks")


def test_two_ranks_write_what_one_process_counts(runs):
    single, two = runs
    s1, s2 = scalars(single), scalars(two)
    share_tags = [t for t in s1 if t.startswith("expert_share/")]
    assert len(share_tags) == 2 * 2 * 4  # layers x sub-layers x experts (tiny: 4 experts, per-expert tags)
    assert set(s1) == set(s2)
    for tag in share_tags + [t for t in s1 if t.startswith("moe/")]:
        for step in range(1, STEPS + 1):
            assert s2[tag][step] == pytest.approx(s1[tag][step], rel=1e-5, abs=1e-6), (tag, step)
    # single process == brute-force bincount of the model's own routing (event values are float32)
    counts = torch.load(os.path.join(single, "brute.pt"))["counts"]
    for (step, layer, kind), c in counts.items():
        want = (c.double() / c.sum()).tolist()
        got = [s1[f"expert_share/L{layer:02d}/{kind}/e{e:03d}"][step] for e in range(len(want))]
        assert got == pytest.approx(want, abs=1e-6)
        assert sum(got) == pytest.approx(1.0, abs=1e-5)
        dead = sum(int(x == 0) for x in c.tolist())
        assert s1[f"moe/L{layer:02d}/{kind}/dead_experts"][step] == dead
        assert s1[f"moe/L{layer:02d}/{kind}/max_over_mean_load"][step] == pytest.approx(
            float(c.max()) / float(c.double().mean()), rel=1e-6)


def test_scalars_go_through_deepspeed_monitor_on_one_step_axis(runs):
    single, two = runs
    ds_dir = os.path.join(two, "job")
    acc = load(ds_dir)  # DeepSpeed's TensorBoardMonitor writes <output_path>/<job_name>
    tags = acc.Tags()["scalars"]
    for t in ("train/loss", "train/lr", "train/tokens_per_s", "train/mfu", "train/skipped_steps",
              "moe/L00/attn/cv", "moe/L01/mlp/H_m", "moe/L01/mlp/H_m_given_x", "moe/L01/mlp/mi",
              "moe/L00/mlp/dropped_frac", "moe/L00/mlp/dead_experts", "moe/L00/mlp/max_over_mean_load"):
        assert t in tags, t
        assert [e.step for e in acc.Scalars(t)] == list(range(1, STEPS + 1))
    # loss is averaged over ranks: equal halves -> the whole-batch token mean
    l1, l2 = scalars(single)["train/loss"], scalars(two)["train/loss"]
    assert l2[1] == pytest.approx(l1[1], rel=1e-4)
    assert scalars(two)["train/lr"][2] == pytest.approx(2e-3)  # rank0 op: not summed
    from molm_ds.config import ModelConfig
    fpt = ModelConfig.from_preset("tiny").flops_per_token(T)
    assert scalars(two)["train/mfu"][1] == pytest.approx(1000.0 * fpt / (1e9 * 2), rel=1e-5)
    # only rank 0 wrote: one event file per writer
    assert len(event_dirs(two)) == 2


def test_histograms_and_heatmaps(runs):
    _, two = runs
    acc = load(os.path.join(two, "job", "expert_load"))
    assert {f"expert_share_hist/L{l:02d}/{k}" for l in range(2) for k in ("attn", "mlp")} <= set(acc.Tags()["histograms"])
    h = acc.Histograms("expert_share_hist/L00/mlp")
    assert [e.step for e in h] == [1, 2] and h[0].histogram_value.num == 4
    assert h[0].histogram_value.sum == pytest.approx(1.0, abs=1e-6)  # the 4 shares sum to 1
    imgs = acc.Tags()["images"]
    assert set(imgs) == {"expert_load_heatmap/attn", "expert_load_heatmap/mlp"}
    assert [e.step for e in acc.Images("expert_load_heatmap/mlp")] == [2]
    rows = open(os.path.join(two, "expert_load.jsonl")).read().splitlines()
    assert len(rows) == 1
