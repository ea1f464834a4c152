"""Rank workers for the expert-parallel model tests (importable by spawned processes).

Reference = one process, full model, same weights: rank r's micro-batch through the full model gives
rank r's expected outputs/loss/aux; the expected gradient is the mean over ranks (data parallel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LR, CLIP, AUX_W = 0.5, 0.05, 0.1
MICRO_B, SEQ = 2, 8


def tiny_config():
    from molm_ds.config import ModelConfig

    return ModelConfig.from_preset("tiny")


def batches(world: int, vocab: int):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (MICRO_B, SEQ), generator=g) for _ in range(world)]


def loss_fn(out, ids):
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return lm + AUX_W * (out.aux["mi"] + out.aux["z"])


def fresh_model(cfg, state=None):
    from molm_ds.model import MoLM

    torch.manual_seed(0)
    m = MoLM(cfg)
    if state is not None:
        m.load_state_dict(state)
    return m


def reference(cfg, world: int):
    """Full model on every rank's micro-batch: outputs per rank, mean grads, norm, SGD step with clipping."""
    from molm_ds.parallel import grad_norm_reference

    model = fresh_model(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    per_rank = []
    for ids in batches(world, cfg.vocab_size):
        out = model(ids)
        loss = loss_fn(out, ids)
        (loss / world).backward()
        per_rank.append(dict(logits=out.logits.detach(), loss=loss.detach(),
                             aux={k: v.detach() for k, v in out.aux.items()}))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = grad_norm_reference(model)
    coef = min(1.0, CLIP / (float(norm) + 1e-6))
    after = {n: (p.detach() - LR * coef * p.grad).clone() for n, p in model.named_parameters()}
    return init, per_rank, grads, norm, after


def engine_worker(rank: int, world: int, ep_size: int, configs: list):
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_stock_clip_grad_norm_
    from deepspeed.utils import safe_get_full_grad

    from molm_ds.parallel import build_param_groups, guard_plain_optimizer, grad_norm, parallelize

    cfg = tiny_config()
    init, ref_rank, ref_grads, ref_norm, ref_after = reference(cfg, world)
    ids = batches(world, cfg.vocab_size)[rank]
    results = {}
    for stage, replicate in configs:
        model = fresh_model(cfg, init)
        info = parallelize(model, ep_size, replicate_attention_experts=replicate)
        opt = torch.optim.SGD(build_param_groups(model), lr=LR)
        ds_config = {"train_micro_batch_size_per_gpu": MICRO_B, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}, "gradient_clipping": CLIP,
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        assert engine.has_moe_layers
        guard_plain_optimizer(engine)
        out = engine(ids)
        loss = loss_fn(out, ids)
        engine.backward(loss)
        names = dict(model.named_parameters())
        if stage == 0:
            grads = {n: p.grad.clone() for n, p in names.items()}
            my_norm = grad_norm(model)
            stock = ds_stock_clip_grad_norm_([p for p in model.parameters()], max_norm=1e9)  # coef 1: measures only
        else:
            grads = {n: safe_get_full_grad(p).clone() for n, p in names.items()}
            my_norm, stock = None, None
        engine.step()
        after = {n: p.detach().clone() for n, p in names.items()}
        slices = {}  # parameter name -> (first, count) of the full stacked weight held here
        for layer in info.layers:
            for pn, _ in model.get_submodule(layer.name).experts.named_parameters():
                slices[f"{layer.name}.experts.{pn}"] = (layer.first_expert, layer.num_local_experts)
        results[(stage, replicate)] = dict(
            logits=out.logits.detach(), loss=loss.detach(), aux={k: v.detach() for k, v in out.aux.items()},
            grads=grads, after=after, slices=slices, engine_norm=engine.get_global_grad_norm(),
            my_norm=my_norm, stock_norm=stock, n_moe_layers=len(info.layers),
            moe_group_names=sorted({g["name"] for g in engine.optimizer.param_groups if g.get("moe")})
            if stage == 0 else None,
        )
        engine.destroy() if hasattr(engine, "destroy") else None
    return dict(results=results, ref_rank=ref_rank[rank], ref_grads=ref_grads, ref_norm=ref_norm, ref_after=ref_after)
