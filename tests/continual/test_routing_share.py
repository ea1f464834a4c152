"""The share of routing on new experts (molm_ds.continual.routing) against brute force: the routers'
probabilities recomputed from each sub-layer's input; 2 gloo ranks with half the batch each give the
single-process numbers."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.continual import grow_experts
from molm_ds.continual.routing import NewExpertShare
from molm_ds.model import MoLM
from molm_ds.train.evaluate import evaluate

B, T = 4, 16


def grown(seed=0, att=2, mlp=3):
    torch.manual_seed(seed)
    model = MoLM(ModelConfig.from_preset("tiny"))
    return grow_experts(model, attention=att, mlp=mlp, seed=seed + 1).eval()


def batches(n=2, rows=B):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (rows, T), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def brute_force(model, bs):
    """Per kind: mean new-expert probability mass and top-k share, from softmax(router.logits(x))
    recomputed on each router's input."""
    seen = {"attn": [], "mlp": []}

    def pre_hook(kind, layer):
        def hook(router, args):
            probs = torch.softmax(router.logits(args[0]).float(), -1)
            idx = probs.topk(router.top_k, -1).indices
            seen[kind].append((probs[:, layer.continual_old_experts:].sum(-1), idx >= layer.continual_old_experts))
        return hook

    handles = []
    for blk in model.blocks:
        handles.append(blk.attn.router.register_forward_pre_hook(pre_hook("attn", blk.attn)))
        handles.append(blk.mlpf.router.register_forward_pre_hook(pre_hook("mlp", blk.mlpf)))
    with torch.no_grad():
        for b in bs:
            model(b["input_ids"])
    for h in handles:
        h.remove()
    out = {}
    for kind, items in seen.items():
        out[f"new_mass_{kind}"] = torch.cat([m for m, _ in items]).double().mean().item()
        out[f"new_topk_{kind}"] = torch.cat([s.flatten() for _, s in items]).double().mean().item()
    return out


def test_share_matches_brute_force():
    model = grown()
    bs = batches()
    with NewExpertShare(model) as share:
        evaluate(model, bs)
    got = share.result()
    want = brute_force(model, bs)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert 0 < got["new_mass_mlp"] < 1 and 0 <= got["new_topk_attn"] <= 1


def test_rows_that_win_everything_take_all_routing():
    model = grown()
    for layer in model.moe_layers():
        r, old = layer.router, layer.continual_old_experts
        with torch.no_grad():  # every hidden unit on (b >> |Bx|): new rows +1, old rows -1
            r.proj.bias.fill_(10.0)
            r.w_gate[:old], r.w_gate[old:] = -1.0, 1.0
    with NewExpertShare(model) as share:
        evaluate(model, batches(1))
    got = share.result()
    for kind in ("attn", "mlp"):  # top-2 of 2 or 3 new experts: every slot, most of the mass
        assert got[f"new_topk_{kind}"] == 1.0 and got[f"new_mass_{kind}"] > 0.99


def test_kind_without_new_experts_is_left_out_and_hooks_removed():
    model = grown(att=0, mlp=2)
    with NewExpertShare(model) as share:
        evaluate(model, batches(1))
    assert set(share.result()) == {"new_mass_mlp", "new_topk_mlp"}
    assert all(not layer._forward_hooks for layer in model.moe_layers())


def _half_batch_worker(rank, world):
    model = grown()
    mine = [{k: v[rank * B // world:(rank + 1) * B // world] for k, v in b.items()} for b in batches()]
    with NewExpertShare(model) as share:
        evaluate(model, mine)
    return share.result()


@pytest.mark.distributed
def test_two_ranks_equal_one_process():
    from molm_ds.testing import run_ranks

    model = grown()
    with NewExpertShare(model) as share:
        evaluate(model, batches())
    want = share.result()
    for got in run_ranks(_half_batch_worker, world_size=2):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6), k  # fp32 forwards at other thread counts
