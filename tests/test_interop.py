"""Interop with released ModuleFormer checkpoints.

`released_forward` below is a small, independent re-implementation of the released forward pass,
written from the released semantics and operating directly on a state dict in the Hugging Face
layout: MLP gate (Linear -> erf GELU -> Linear, no bias), full softmax, un-renormalised top-k gates,
stick-breaking attention in probability space with a strictly-lower-triangular cumulative matrix
(current token included, leftover mass dropped), gelu_new MLP experts, weights [E, in, out]."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from molm_ds.interop import load_moduleformer, save_moduleformer


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _gate(sd, p, x, k):
    logits = F.gelu(x @ sd[p + ".w_gate.0.weight"].t() + sd[p + ".w_gate.0.bias"]) @ sd[p + ".w_gate.3.weight"].t()
    return torch.softmax(logits, -1).topk(k, -1)  # values are the gates (not renormalised)


def _gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def released_forward(sd, c, ids):
    B, T = ids.shape
    x = sd["transformer.wte.weight"][ids]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        h = _ln(x, sd, p + ".ln_1")
        gates, idx = _gate(sd, p + ".attn.q_proj.gate", h, c["k_att"])
        q = torch.einsum("btd,btkda->btka", h, sd[p + ".attn.q_proj.experts.weight"][idx])
        if c["att_hidden"] == c["n_embd"] and c["n_head"] == 1:
            kk = vv = h
        else:
            kk = h @ sd[p + ".attn.k_proj.weight"].t() + sd[p + ".attn.k_proj.bias"]
            vv = h @ sd[p + ".attn.v_proj.weight"].t() + sd[p + ".attn.v_proj.bias"]
        nh, hs = c["n_head"], c["att_hidden"] // c["n_head"]
        q = q.view(B, T, c["k_att"], nh, hs)
        kk, vv = kk.view(B, T, nh, hs), vv.view(B, T, nh, hs)
        logits = torch.einsum("bikhd,bjhd->bkhij", q, kk) / math.sqrt(hs)
        future = torch.ones(T, T).tril() == 0
        z = torch.sigmoid(logits).masked_fill(future, 0)
        log_beta = F.logsigmoid(-logits).masked_fill(future, 0)
        cum = torch.ones(T, T).tril(-1)  # cum[l, j] = 1 iff l > j
        att = z * torch.einsum("bkhil,lj->bkhij", log_beta, cum).exp()
        y = torch.einsum("bkhij,bjhd->bikhd", att, vv).reshape(B, T, c["k_att"], c["att_hidden"])
        out = torch.einsum("btka,btkad->btkd", y, sd[p + ".attn.q_proj.output_experts.weight"][idx])
        x = x + (gates[..., None] * out).sum(2)
        h = _ln(x, sd, p + ".ln_2")
        gates, idx = _gate(sd, p + ".mlpf.gate", h, c["k_mlp"])
        a = _gelu_new(torch.einsum("btd,btkdh->btkh", h, sd[p + ".mlpf.experts.weight"][idx]))
        out = torch.einsum("btkh,btkhd->btkd", a, sd[p + ".mlpf.output_experts.weight"][idx])
        x = x + (gates[..., None] * out).sum(2)
    return _ln(x, sd, "transformer.ln_f") @ sd["lm_head.weight"].t()


def make_checkpoint(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.3: torch.randn(*s, generator=g) * std  # noqa: E731
    D, V, R, A, H = c["n_embd"], c["vocab_size"], c["gating_size"], c["att_hidden"], c["ffd_hidden"]
    sd = {"transformer.wte.weight": r(V, D, std=1.0), "lm_head.weight": r(V, D),
          "transformer.ln_f.weight": 1 + r(D, std=0.1), "transformer.ln_f.bias": r(D, std=0.1)}
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{p}.{ln}.weight"], sd[f"{p}.{ln}.bias"] = 1 + r(D, std=0.1), r(D, std=0.1)
        for sub, E, hid in (("attn.q_proj", c["n_att_experts"], A), ("mlpf", c["n_mlp_experts"], H)):
            sd[f"{p}.{sub}.experts.weight"] = r(E, D, hid)
            sd[f"{p}.{sub}.output_experts.weight"] = r(E, hid, D)
            sd[f"{p}.{sub}.gate.w_gate.0.weight"] = r(R, D)
            sd[f"{p}.{sub}.gate.w_gate.0.bias"] = r(R)
            sd[f"{p}.{sub}.gate.w_gate.3.weight"] = r(E, R, std=2.0)
        if not (A == D and c["n_head"] == 1):
            for kv in ("k_proj", "v_proj"):
                sd[f"{p}.attn.{kv}.weight"], sd[f"{p}.attn.{kv}.bias"] = r(A, D), r(A, std=0.1)
        sd[f"{p}.attn.mask"] = torch.ones(16, 16, dtype=torch.int8).tril()
        sd[f"{p}.attn.cum_weight"] = torch.ones(16, 16).tril(-1)
    return sd


MOLM_LIKE = dict(vocab_size=37, n_layer=2, n_embd=8, n_head=1, att_hidden=8, ffd_hidden=12, n_att_experts=4,
                 k_att=2, n_mlp_experts=6, k_mlp=2, gating_size=5, activation_function="gelu_new", gate_type="mlp")
MULTI_HEAD = dict(MOLM_LIKE, n_head=2, att_hidden=10, k_att=3)


def _write(tmp_path, c, sd, fmt):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(c))
    if fmt == "safetensors":
        save_file(sd, str(tmp_path / "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:  # two shards plus an index
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(tmp_path / name))
        index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("c", [MOLM_LIKE, MULTI_HEAD], ids=["molm", "multihead"])
def test_load_matches_released_forward(tmp_path, fmt, c):
    sd = make_checkpoint(c)
    _write(tmp_path, c, sd, fmt)
    model = load_moduleformer(tmp_path)
    ids = torch.randint(0, c["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    want = released_forward(sd, c, ids)
    got = model(ids).logits
    assert got.shape == (2, 7, c["vocab_size"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert model.config.kv_proj == (c is MULTI_HEAD)


def test_round_trip(tmp_path):
    sd = make_checkpoint(MULTI_HEAD, seed=3)
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a", MULTI_HEAD, sd, "safetensors")
    model = load_moduleformer(tmp_path / "a")
    save_moduleformer(model, tmp_path / "b")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "b" / "model.safetensors"))
    kept = {k: v for k, v in sd.items() if not k.endswith(("attn.mask", "attn.cum_weight"))}
    assert sorted(saved) == sorted(kept)
    for k in kept:
        assert torch.equal(saved[k], kept[k]), k
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in ("n_layer", "n_embd", "n_att_experts", "n_mlp_experts", "k_att", "k_mlp", "att_hidden",
                "ffd_hidden", "gating_size", "n_head", "vocab_size"):
        assert cfg[key] == MULTI_HEAD[key], key
    again = load_moduleformer(tmp_path / "b")
    ids = torch.randint(0, 37, (1, 5))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_clear_errors(tmp_path):
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM

    (tmp_path / "config.json").write_text(json.dumps(MOLM_LIKE))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_moduleformer(tmp_path)
    sd = make_checkpoint(MOLM_LIKE)
    del sd["transformer.h.1.mlpf.experts.weight"]
    _write(tmp_path, MOLM_LIKE, sd, "safetensors")
    with pytest.raises(ValueError, match="missing .*transformer.h.1.mlpf.experts.weight"):
        load_moduleformer(tmp_path)
    model = MoLM(ModelConfig.from_preset("tiny", stickbreaking_include_current=False, n_head=1))
    with pytest.raises(ValueError, match="stickbreaking_include_current"):
        save_moduleformer(model, tmp_path / "x")
    model = MoLM(ModelConfig.from_preset("tiny"))  # n_head=2 without kv projections
    with pytest.raises(ValueError, match="kv_proj"):
        save_moduleformer(model, tmp_path / "y")
