"""Rank worker for tests/model/test_compile.py (importable by spawned processes)."""

from __future__ import annotations


def ep2_compile_worker(rank: int, world_size: int, preset: str) -> tuple:
    """The MoLM of ``preset`` with its experts split over the ranks (ep_size = world size): dynamo's graph
    and break counts of forward + loss, and whether the compiled loss and every gradient equal eager's."""
    import torch
    import torch._dynamo

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.parallel import parallelize

    torch._dynamo.reset()
    torch._dynamo.config.capture_scalar_outputs = True  # as molm_ds.train.engine.compile_model sets it
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset(preset))
    parallelize(model, world_size, replicate_attention_experts=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank))

    def loss_fn(i):
        out = model(i)
        return out.logits.float().square().mean() + sum(out.aux.values())

    explained = torch._dynamo.explain(loss_fn)(ids)
    torch._dynamo.reset()
    params = list(model.parameters())
    loss_e = loss_fn(ids)
    grads_e = torch.autograd.grad(loss_e, params)
    loss_c = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(ids)
    grads_c = torch.autograd.grad(loss_c, params)
    torch._dynamo.reset()
    return (explained.graph_count, explained.graph_break_count, [str(r.reason)[:300] for r in explained.break_reasons],
            torch.equal(loss_c.detach(), loss_e.detach()), all(torch.equal(a, b) for a, b in zip(grads_c, grads_e)))
