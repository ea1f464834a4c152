"""Strategies and gradient masks: frozen parameters bit-identical after AdamW steps (weight decay on),
new_only changes only new experts and A', the A' penalty's gradient reaches A' only, distillation KL
against a token loop."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.continual import (
    apply_strategy, continual_param_groups, distillation_kl, distillation_kl_reference, grow_experts,
    new_router_rows_penalty,
)
from molm_ds.model import MoLM

NEW = 2  # new experts per sub-layer; tiny has 4


def grown(seed=0, kv_proj=False):
    torch.manual_seed(seed)
    model = MoLM(ModelConfig.from_preset("tiny"))
    return grow_experts(model, attention=NEW, mlp=NEW, seed=seed + 1)


def new_part(name, p):
    """Bool mask of the entries that may change under new_only (brute force from names and shapes)."""
    m = torch.zeros_like(p, dtype=torch.bool)
    if ".experts." in name or name.endswith("router.w_gate"):
        m[4:] = True
    return m


def train_steps(model, groups, steps=3):
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(i))
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss = loss + 0.01 * out.aux["mi"] + 0.1 * new_router_rows_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def groups_for(model, strategy, train_others=False):
    """The strategy's groups as the trainer hands them to DeepSpeed (split by its MoE helper)."""
    from molm_ds.parallel import build_param_groups

    return build_param_groups(continual_param_groups(model, strategy=strategy, train_others=train_others,
                                                     weight_decay=0.1, lr_new_experts=1e-2, lr_router=5e-3,
                                                     lr_others=1e-3))


def test_new_only_changes_only_new_experts_and_new_router_rows():
    model = grown()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, groups_for(model, "new_only"))
    changed_somewhere = 0
    for n, p in model.named_parameters():
        may = new_part(n, p)
        assert torch.equal(p.detach()[~may], before[n][~may]), f"{n}: a frozen entry changed"
        if may.any():
            assert not torch.equal(p.detach()[may], before[n][may]), f"{n}: new rows did not train"
            changed_somewhere += 1
    assert changed_somewhere == 2 * 2 * 2 + 2 * 2  # 2 layers x 2 sub-layers x 2 expert tensors, + 4 router A


def test_full_router_freezes_old_experts_and_trains_every_router_param():
    model = grown()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, groups_for(model, "full_router"))
    for n, p in model.named_parameters():
        if ".experts." in n:
            assert torch.equal(p.detach()[:4], before[n][:4]), n
            assert not torch.equal(p.detach()[4:], before[n][4:]), n
        elif ".router." in n:
            assert not torch.equal(p.detach(), before[n]), n
        else:  # others frozen unless train_others
            assert torch.equal(p.detach(), before[n]) and not p.requires_grad, n


def test_frozen_params_stay_out_of_the_optimizer_and_lrs_per_group():
    model = grown()
    groups = groups_for(model, "full_router", train_others=True)
    by_label = {g["label"]: g for g in groups}
    assert by_label["new_experts_no_decay"]["lr"] == 1e-2 and by_label["new_experts_no_decay"]["weight_decay"] == 0
    assert by_label["router"]["lr"] == 5e-3 and by_label["others"]["lr"] == 1e-3
    model = grown()
    in_opt = {id(p) for g in groups_for(model, "new_only") for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad == (".experts." in n or n.endswith("w_gate")), n


def test_a_layer_without_new_experts_is_frozen_whole():
    torch.manual_seed(0)
    model = grow_experts(MoLM(ModelConfig.from_preset("tiny")), attention=0, mlp=2, seed=1)
    g = apply_strategy(model, strategy="new_only")
    assert not model.blocks[0].attn.experts.w_q.requires_grad and not model.blocks[0].attn.router.w_gate.requires_grad
    assert model.blocks[0].mlpf.experts.w1.requires_grad and len(g["masked"]) == 2 * 2 + 2


def test_router_penalty_gradient_reaches_new_rows_only():
    model = grown()
    pen = new_router_rows_penalty(model)
    manual = sum(l.router.w_gate[4:].pow(2).sum() for l in model.moe_layers())
    assert torch.allclose(pen, manual)
    pen.backward()
    for n, p in model.named_parameters():
        if n.endswith("router.w_gate"):
            assert torch.equal(p.grad[4:], 2 * p.detach()[4:]) and not p.grad[:4].any(), n
        else:
            assert p.grad is None, n


def test_mask_hook_keeps_nan_out_of_frozen_rows():
    model = grown()
    apply_strategy(model, strategy="new_only")
    w = model.blocks[0].mlpf.experts.w1
    (w.sum() * float("nan")).backward()
    assert not w.grad[:4].isnan().any() and w.grad[4:].isnan().all()


@pytest.mark.parametrize("temperature, masked", [(1.0, False), (2.0, True)])
def test_distillation_kl_matches_token_loop(temperature, masked):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool) if masked else None
    fast = distillation_kl(student_logits_BTV=s, teacher_logits_BTV=t, temperature=temperature, mask_BT=mask)
    slow = distillation_kl_reference(student_logits_BTV=s, teacher_logits_BTV=t, temperature=temperature, mask_BT=mask)
    assert torch.allclose(fast, slow, atol=1e-6)
    gf, = torch.autograd.grad(fast, s)
    gs, = torch.autograd.grad(slow, s)
    assert torch.allclose(gf, gs, atol=1e-6)
    assert distillation_kl(student_logits_BTV=t, teacher_logits_BTV=t).abs() < 1e-6
