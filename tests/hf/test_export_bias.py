"""The balancing bias travels to Hugging Face: the exported model chooses the same experts as the trainer's
model, token by token and sub-layer by sub-layer, with a bias large enough to change the choice."""

from __future__ import annotations

import json

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_routes_the_same_tokens(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from molm_ds.hf import export_hf
    from molm_ds.interop import config_from_hf
    from molm_ds.train.balance import bias_routers

    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny", router_balance="bias")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for r in bias_routers(model):
            r.expert_bias_E.copy_(torch.randn(r.num_experts) * 0.3)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
        for r in bias_routers(model):
            r.expert_bias_E = r.expert_bias_E.float()  # as the trainer keeps it
    info = export_hf(model, str(tmp_path), tokenizer=None, context_length=64, dtype=dtype)
    assert not info["ibm_compatible"] and any("router_balance" in w for w in info["ibm_incompatibilities"])
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(hf_cfg) == model.config
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True,
                                              torch_dtype=getattr(torch, dtype)).eval()

    got = {}
    for name, mod in hf.named_modules():
        if hasattr(mod, "route") and hasattr(mod, "gate"):
            def wrap(x, _route=mod.route, _name=name):
                r = _route(x)
                got[_name] = r
                return r
            mod.route = wrap
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        model(ids)
        hf(ids)
    n_changed = 0
    for i, block in enumerate(model.blocks):
        for ours, theirs in ((block.attn, f"transformer.h.{i}.attn.q_proj"), (block.mlpf, f"transformer.h.{i}.mlpf")):
            idx_TK = ours.last_routing.idx_TK
            r = got[theirs]
            T, K = r.gates_TK.shape
            hf_idx = torch.empty(T * K, dtype=torch.long)
            hf_idx[r.order_N] = torch.repeat_interleave(torch.arange(len(r.counts_E)), torch.tensor(r.counts_E))
            assert torch.equal(hf_idx.view(T, K), idx_TK), theirs
            n_changed += int((ours.last_routing.probs_TE.topk(K).indices != idx_TK).any(-1).sum())
    assert n_changed > 0  # the bias changed some choices, so the test can fail
