"""torch.compile(fullgraph=True) traces an MoE MLP layer and an attention layer end to end on the CPU:
the kernels are torch.library custom ops (fake implementations for tracing, registered autograd), and
the layers around them have no graph breaks. Compiled outputs and gradients equal the eager ones."""

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MixtureOfAttention, MoEMLP


def _cfg(**kw):
    base = dict(vocab_size=11, n_layer=1, d_model=16, n_att_experts=4, k_att=2, att_hidden=16, n_head=2,
                n_mlp_experts=4, k_mlp=2, ffd_hidden=24, gating_size=8)
    base.update(kw)
    return ModelConfig(**base)


def _step(fn, layer, x):
    xi = x.clone().requires_grad_()
    y, aux = fn(xi)[:2]
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(aux.values())
    return y.detach(), torch.autograd.grad(loss, [xi, *layer.parameters()])


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setenv("MOLM_DS_KERNELS", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("layer_kind", ["mlp", "attention"])
def test_layer_compiles_fullgraph_and_matches_eager(backend, layer_kind):
    torch.manual_seed(0)
    layer = MoEMLP(_cfg()) if layer_kind == "mlp" else MixtureOfAttention(_cfg(stickbreaking_include_current=False))
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y_c, g_c = _step(compiled, layer, x)
    y_e, g_e = _step(layer, layer, x)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_a_graph_break_is_an_error_here():
    """The test above can fail: a branch on a tensor's value inside the layer breaks the graph."""
    layer = MoEMLP(_cfg())
    real = layer.router.forward

    def syncing(x, mask=None):
        out = real(x, mask)
        if bool(out.probs_TE.max() > 0.5):  # a host sync and a data-dependent branch
            return out
        return out

    layer.router.forward = syncing
    with pytest.raises(Exception):
        torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(1, 5, 16))


def _model_loss(model, ids):
    out = model(ids)
    return out.logits.float().square().mean() + sum(out.aux.values())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_whole_model_compiles_fullgraph_forward_and_backward(preset):
    """MoLM forward and backward in one graph each: 0 graph breaks (dynamo's own count), and the compiled
    loss and every gradient equal the eager ones (aot_eager: the traced graphs run op for op)."""
    from molm_ds.model import MoLM

    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset(preset))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    explained = torch._dynamo.explain(lambda i: _model_loss(model, i))(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    params = list(model.parameters())
    loss_e = _model_loss(model, ids)
    grads_e = torch.autograd.grad(loss_e, params)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c = _model_loss(compiled, ids)
    grads_c = torch.autograd.grad(loss_c, params)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_whole_model_compiles_fullgraph_under_expert_parallelism(preset):
    """ep_size 2 on 2 gloo ranks: still one graph and no break (the all-to-all split sizes are symbolic
    sizes read from the device, the exchange a traceable collective), and compiled loss and gradients equal
    eager's on every rank."""
    from molm_ds.testing import run_ranks

    from tests.model._compile_workers import ep2_compile_worker

    for graphs, breaks, reasons, same_loss, same_grads in run_ranks(ep2_compile_worker, world_size=2, args=(preset,)):
        assert (graphs, breaks) == (1, 0), reasons
        assert same_loss and same_grads
