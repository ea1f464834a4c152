"""Single-process checks: config errors, ZeRO-3 refusal, the DeepSpeed-MoE bridge (isinstance, param
marks, per-expert state-dict keys both ways), param groups, ep_size 1 parallelize, grad norm."""

import pytest
import torch
from molm_ds.testing import run_ranks


def test_check_expert_parallel_errors():
    from molm_ds.parallel import check_expert_parallel

    check_expert_parallel(ep_size=2, world_size=4, expert_counts={"mlp": 8})
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        check_expert_parallel(ep_size=2, world_size=3, expert_counts={})
    with pytest.raises(ValueError, match="6 experts cannot be split over ep_size=4"):
        check_expert_parallel(ep_size=4, world_size=8, expert_counts={"mlp": 6})
    with pytest.raises(ValueError, match="positive integer"):
        check_expert_parallel(ep_size=0, world_size=8, expert_counts={})


def test_bridge_is_deepspeed_moe_and_state_dict_round_trips():
    from deepspeed.moe.layer import MoE

    from molm_ds.model import MLPExperts
    from molm_ds.checkpoint.layout import EXPERT_INFIX as EXPERT_KEY
    from molm_ds.parallel import to_deepspeed_moe

    torch.manual_seed(0)
    full = MLPExperts(4, 3, 5)
    w1, w2 = full.w1.detach().clone(), full.w2.detach().clone()
    ex = MLPExperts(4, 3, 5)
    ex.load_state_dict(full.state_dict())
    to_deepspeed_moe(ex, num_experts=4, ep_size=2, ep_rank=1, group_name="ep_size_2")
    assert isinstance(ex, MoE) and isinstance(ex, MLPExperts)
    assert ex.num_local_experts == 2 and ex.expert_group_name == "ep_size_2" and ex.num_experts == 2
    assert [n for n, _ in ex.named_parameters()] == ["w1", "w2"]
    for p in ex.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_2"
    torch.testing.assert_close(ex.w1, w1[2:4], rtol=0, atol=0)
    sd = ex.state_dict()
    assert set(sd) == {f"{EXPERT_KEY}.{i}.{w}" for i in range(2) for w in ("w1", "w2")}
    torch.testing.assert_close(sd[f"{EXPERT_KEY}.1.w2"], w2[3], rtol=0, atol=0)
    # forward unchanged: local experts on rows grouped by local expert
    x = torch.randn(3, 3)
    counts = torch.tensor([1, 2])
    torch.testing.assert_close(ex(x, counts), full.forward_reference(x, torch.tensor([0, 0, 1, 2])))
    # load per-expert keys (e.g. swapped experts) and a full stacked weight (takes the local slice)
    swapped = {f"{EXPERT_KEY}.0.w1": sd[f"{EXPERT_KEY}.1.w1"], f"{EXPERT_KEY}.1.w1": sd[f"{EXPERT_KEY}.0.w1"],
               f"{EXPERT_KEY}.0.w2": sd[f"{EXPERT_KEY}.0.w2"], f"{EXPERT_KEY}.1.w2": sd[f"{EXPERT_KEY}.1.w2"]}
    ex.load_state_dict(swapped)
    torch.testing.assert_close(ex.w1[0], w1[3], rtol=0, atol=0)
    ex.load_state_dict({"w1": w1, "w2": w2})
    torch.testing.assert_close(ex.w1, w1[2:4], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="per-expert keys missing"):
        ex.load_state_dict({f"{EXPERT_KEY}.0.w1": w1[2], f"{EXPERT_KEY}.0.w2": w2[2], f"{EXPERT_KEY}.1.w2": w2[3]})
    with pytest.raises(ValueError, match="already expert-parallel"):
        to_deepspeed_moe(ex, num_experts=2, ep_size=1, ep_rank=0, group_name="ep_size_1")


def test_build_param_groups_splits_experts_and_keeps_labels():
    from molm_ds.parallel import build_param_groups

    dense, e1, e2, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
    for e in (e1, e2):
        e.allreduce, e.group_name = False, "ep_size_2"
    frozen.requires_grad_(False)
    groups = build_param_groups([{"name": "old", "params": [dense, e1, frozen], "lr": 0.1},
                                 {"name": "new", "params": [e2], "lr": 1.0}])
    by = {(g["label"], bool(g.get("moe"))): g for g in groups}
    assert set(by) == {("old", False), ("old", True), ("new", True)}
    assert by[("old", False)]["params"] == [dense] and by[("old", False)]["lr"] == 0.1
    assert by[("old", True)]["params"] == [e1] and by[("old", True)]["name"] == "ep_size_2"
    assert by[("new", True)]["params"] == [e2] and by[("new", True)]["lr"] == 1.0
    with pytest.raises(ValueError, match="more than one group"):
        build_param_groups([{"params": [dense]}, {"params": [dense]}])
    with pytest.raises(ValueError, match="'params' key"):
        build_param_groups([{"lr": 1}])


def _single_rank_worker(rank, world):
    """ep_size 1 on one rank: bridged experts, LocalDispatcher kept, same outputs, correct grad norm."""
    from molm_ds.config import ModelConfig
    from molm_ds.model import LocalDispatcher, MoLM
    from molm_ds.parallel import grad_norm, grad_norm_reference, parallelize

    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    ref = MoLM(cfg)
    model = MoLM(cfg)
    model.load_state_dict(ref.state_dict())
    info = parallelize(model, 1, replicate_attention_experts=True)
    errors = []
    try:
        parallelize(MoLM(ModelConfig.from_preset("tiny", n_mlp_experts=3)), 2, replicate_attention_experts=True)
    except ValueError as e:
        errors.append(str(e))
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    a, b = ref(ids), model(ids)
    a.logits.sum().backward()
    b.logits.sum().backward()
    return dict(kinds=[l.kind for l in info.layers], replicated=info.replicated, errors=errors,
                local=all(isinstance(m.dispatcher, LocalDispatcher) for m in (model.blocks[0].attn, model.blocks[0].mlpf)),
                same=torch.equal(a.logits, b.logits), norms=(float(grad_norm(model)), float(grad_norm_reference(ref))),
                keys=sorted(k for k in model.state_dict() if "blocks.0.mlpf.experts" in k))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_parallelize_ep1_single_rank():
    (r,) = run_ranks(_single_rank_worker, 1)
    assert r["kinds"] == ["mlp", "mlp"] and r["replicated"] == ["blocks.0.attn", "blocks.1.attn"]
    assert r["local"] and r["same"]
    assert r["norms"][0] == pytest.approx(r["norms"][1], rel=1e-6)
    assert r["keys"][0] == "blocks.0.mlpf.experts.deepspeed_moe.experts.deepspeed_experts.0.w1"
    assert len(r["errors"]) == 1 and "does not divide the world size 1" in r["errors"][0]
