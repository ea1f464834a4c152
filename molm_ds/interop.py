"""Released ModuleFormer / MoLM checkpoints (Hugging Face layout) in and out.

    model = load_moduleformer("path/to/MoLM-350M-4B")   # molm_ds MoLM on the CPU, eval mode
    logits = model(input_ids_BT).logits                 # equal to the released implementation's
    save_moduleformer(model, "out_dir")                 # config.json + model.safetensors

Layout (weights are [E, in, out], the same orientation as ours, so no transposes):

    transformer.wte.weight                              -> wte.weight
    transformer.h.{i}.ln_1.{weight,bias}                -> blocks.{i}.ln_1.*
    transformer.h.{i}.attn.q_proj.experts.weight        -> blocks.{i}.attn.experts.w_q   [E, D, A]
    transformer.h.{i}.attn.q_proj.output_experts.weight -> blocks.{i}.attn.experts.w_o   [E, A, D]
    transformer.h.{i}.attn.q_proj.gate.w_gate.0.weight  -> blocks.{i}.attn.router.proj.weight [R, D]
    transformer.h.{i}.attn.q_proj.gate.w_gate.0.bias    -> blocks.{i}.attn.router.proj.bias
    transformer.h.{i}.attn.q_proj.gate.w_gate.3.weight  -> blocks.{i}.attn.router.w_gate [E, R]
    transformer.h.{i}.attn.{k,v}_proj.{weight,bias}     -> blocks.{i}.attn.{k,v}_proj.* (only when
                                                           att_hidden != n_embd or n_head > 1)
    transformer.h.{i}.mlpf.{experts,output_experts}.weight -> blocks.{i}.mlpf.experts.{w1,w2}
    transformer.h.{i}.mlpf.gate.w_gate.*                -> blocks.{i}.mlpf.router.*
    transformer.ln_f.*, lm_head.weight                  -> ln_f.*, lm_head.weight
    (gate_type "linear": w_gate.0.weight [E, D] -> router.w_gate)

The buffers `attn.mask` and `attn.cum_weight` are dropped. The released code builds its LayerNorms
with the PyTorch default eps (1e-5) whatever `layer_norm_epsilon` says; so do we. Released
activation "gelu_new" is our `gelu_tanh`; other activations and the "gmm" gate are rejected.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

from molm_ds.config import ModelConfig
from molm_ds.log import get_logger
from molm_ds.model import MoLM

log = get_logger("interop")
PathLike = Union[str, os.PathLike]

_HF_DEFAULTS = dict(vocab_size=50295, n_embd=1024, n_layer=24, n_head=8, att_hidden=512, ffd_hidden=2048,
                    activation_function="gelu_new", sample_topk=0, gating_size=256, n_att_experts=32,
                    k_att=2, n_mlp_experts=32, k_mlp=2, initializer_range=0.02, gate_type="mlp")
_DROPPED = re.compile(r"transformer\.h\.\d+\.attn\.(mask|cum_weight|causal_mask)$")


FORMAT_KEY = "molm_ds_format"  # in config.json files written by molm-ds (hf_config); released ones lack it


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a config.json dict: a released one (missing keys take the released defaults;
    K/V projections follow the released rule, LayerNorm eps is 1e-5 as in the released code) or one
    written by ``hf_config`` (every field explicit)."""
    c = {**_HF_DEFAULTS, **hf}
    ours = FORMAT_KEY in hf
    if c["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh", "swiglu"):
        raise ValueError(f"activation_function={c['activation_function']!r} is not supported; only 'gelu_new' (tanh GELU)"
                         " or 'swiglu'")
    if c["gate_type"] not in ("mlp", "linear"):
        raise ValueError(f"gate_type={c['gate_type']!r} is not supported; only 'mlp' and 'linear'")
    released_kv = not (c["att_hidden"] == c["n_embd"] and c["n_head"] == 1)
    return ModelConfig(
        vocab_size=c["vocab_size"], n_layer=c["n_layer"], d_model=c["n_embd"],
        n_att_experts=c["n_att_experts"], k_att=c["k_att"], att_hidden=c["att_hidden"], n_head=c["n_head"],
        kv_proj=bool(c["kv_proj"]) if ours else released_kv,
        stickbreaking_include_current=bool(c.get("stickbreaking_include_current", True)),
        n_mlp_experts=c["n_mlp_experts"], k_mlp=c["k_mlp"], ffd_hidden=c["ffd_hidden"],
        mlp_activation="swiglu" if c["activation_function"] == "swiglu" else "gelu_tanh",
        gating_size=c["gating_size"], router_type="molm" if c["gate_type"] == "mlp" else "linear",
        renormalize_topk=bool(c.get("renormalize_topk", False)), sample_topk=c["sample_topk"],
        routing=c.get("routing", "token_choice"), capacity_factor=c.get("capacity_factor"),
        router_balance=c.get("router_balance", "none"), router_bias_rate=c.get("router_bias_rate", 1e-3),
        init_std=c["initializer_range"], layer_norm_eps=float(c["layer_norm_epsilon"]) if ours else 1e-5,
        router_init=c.get("router_init", "released"),  # released checkpoints say nothing: theirs
        dropout=float(c.get("resid_pdrop", 0.0)) if ours else 0.0,
        # pruned models: per-layer counts; the released modeling code has no such keys
        att_experts_per_layer=c.get("n_att_experts_per_layer"), mlp_experts_per_layer=c.get("n_mlp_experts_per_layer"),
    )


def _uniform(counts, full: int) -> Optional[int]:
    """The single expert count of every layer, or None when layers differ."""
    if counts is None:
        return full
    return counts[0] if len(set(counts)) == 1 else None


def ibm_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Why the released ModuleFormer code cannot build this model (empty: it can, with the real counts
    that ``config_to_hf`` writes). Training-only options (expert choice, capacity, sample_topk) do not
    count: inference is plain dropless top-k in both."""
    bad = []
    if cfg.kv_proj == (cfg.att_hidden == cfg.d_model and cfg.n_head == 1):
        bad.append("kv_proj must be True exactly when att_hidden != d_model or n_head > 1")
    if not cfg.stickbreaking_include_current:
        bad.append("stickbreaking_include_current must be True")
    if cfg.mlp_activation != "gelu_tanh":
        bad.append("mlp_activation must be gelu_tanh")
    if cfg.renormalize_topk:
        bad.append("renormalize_topk must be False")
    if cfg.router_balance != "none":
        bad.append("router_balance must be 'none' (the released code has no routing bias and would choose other experts)")
    if cfg.layer_norm_eps != 1e-5:
        bad.append(f"layer_norm_eps must be 1e-5 (the released code ignores layer_norm_epsilon), not {cfg.layer_norm_eps:g}")
    for kind, counts, full in (("attention", cfg.att_experts_per_layer, cfg.n_att_experts),
                               ("MLP", cfg.mlp_experts_per_layer, cfg.n_mlp_experts)):
        if _uniform(counts, full) is None:
            bad.append(f"every layer must keep the same number of {kind} experts (per layer: {list(counts)})")
    return bad


def hf_config(cfg: ModelConfig) -> dict:
    """config.json keys for any ModelConfig: the released names (with the real expert counts when every
    layer has the same, and k capped at them) plus the molm-ds keys the released code lacks, so that
    ``config_from_hf(hf_config(cfg))`` builds the same model. Per-layer lists only when layers differ."""
    att = _uniform(cfg.att_experts_per_layer, cfg.n_att_experts)
    mlp = _uniform(cfg.mlp_experts_per_layer, cfg.n_mlp_experts)
    out = dict(
        vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head,
        att_hidden=cfg.att_hidden, ffd_hidden=cfg.ffd_hidden,
        n_att_experts=att or cfg.n_att_experts, k_att=min(cfg.k_att, att) if att else cfg.k_att,
        n_mlp_experts=mlp or cfg.n_mlp_experts, k_mlp=min(cfg.k_mlp, mlp) if mlp else cfg.k_mlp,
        gating_size=cfg.gating_size, gate_type="mlp" if cfg.router_type == "molm" else "linear",
        sample_topk=cfg.sample_topk, activation_function="gelu_new" if cfg.mlp_activation == "gelu_tanh" else "swiglu",
        layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=cfg.init_std,
        block_size=512, history_length=512, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
        moe_pdrop=0.0, aux_loss_type="mi", aux_loss_weight=0, tie_word_embeddings=False,
        kv_proj=cfg.kv_proj, stickbreaking_include_current=cfg.stickbreaking_include_current,
        renormalize_topk=cfg.renormalize_topk, routing=cfg.routing, capacity_factor=cfg.capacity_factor,
        router_init=cfg.router_init,
    )
    if cfg.router_balance != "none":  # only then, so configs of models without one stay as they were
        out.update(router_balance=cfg.router_balance, router_bias_rate=cfg.router_bias_rate)
    if att is None:
        out["n_att_experts_per_layer"] = list(cfg.att_experts_per_layer)
    if mlp is None:
        out["n_mlp_experts_per_layer"] = list(cfg.mlp_experts_per_layer)
    out[FORMAT_KEY] = 1
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    """The released config.json for a ModelConfig, with the real expert counts; errors for models whose
    layers the released layout cannot describe. Per-layer counts that differ are written as
    ``n_{att,mlp}_experts_per_layer`` (``config_from_hf`` reads them; the released code cannot build such a
    model: it loads there exactly when ``ibm_incompatibilities`` is empty)."""
    bad = [b for b in ibm_incompatibilities(cfg) if not b.startswith("every layer must keep")]
    if bad:
        raise ValueError("this model has no released ModuleFormer equivalent: " + "; ".join(bad))
    return dict(model_type="moduleformer", architectures=["ModuleFormerForCausalLM"]) | hf_config(cfg)


def _router_map(hf_gate: str, ours: str, cfg: ModelConfig) -> dict[str, str]:
    bias = {f"{hf_gate}.expert_bias": f"{ours}.expert_bias_E"} if cfg.router_balance == "bias" else {}
    if cfg.router_type == "linear":
        return {f"{hf_gate}.w_gate.0.weight": f"{ours}.w_gate", **bias}
    return {f"{hf_gate}.w_gate.0.weight": f"{ours}.proj.weight", f"{hf_gate}.w_gate.0.bias": f"{ours}.proj.bias",
            f"{hf_gate}.w_gate.3.weight": f"{ours}.w_gate", **bias}


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Released key -> molm_ds key, for every parameter (and the balancing bias buffer,
    ``...gate.expert_bias`` [E], a molm-ds key the released code lacks)."""
    m = {"transformer.wte.weight": "wte.weight", "transformer.ln_f.weight": "ln_f.weight",
         "transformer.ln_f.bias": "ln_f.bias", "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layer):
        hf, us = f"transformer.h.{i}", f"blocks.{i}"
        for ln in ("ln_1", "ln_2"):
            m[f"{hf}.{ln}.weight"], m[f"{hf}.{ln}.bias"] = f"{us}.{ln}.weight", f"{us}.{ln}.bias"
        m[f"{hf}.attn.q_proj.experts.weight"] = f"{us}.attn.experts.w_q"
        m[f"{hf}.attn.q_proj.output_experts.weight"] = f"{us}.attn.experts.w_o"
        m.update(_router_map(f"{hf}.attn.q_proj.gate", f"{us}.attn.router", cfg))
        if cfg.kv_proj:
            for p in ("k_proj", "v_proj"):
                for t in ("weight", "bias"):
                    m[f"{hf}.attn.{p}.{t}"] = f"{us}.attn.{p}.{t}"
        m[f"{hf}.mlpf.experts.weight"] = f"{us}.mlpf.experts.w1"
        m[f"{hf}.mlpf.output_experts.weight"] = f"{us}.mlpf.experts.w2"
        m.update(_router_map(f"{hf}.mlpf.gate", f"{us}.mlpf.router", cfg))
    return m


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, pytorch_model.bin, or a sharded
    `*.index.json` (its `weight_map` names the shard of every key)."""
    d = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return _read_file(d / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_read_file(d / shard))
            return sd
    raise FileNotFoundError(
        f"{d}: no model.safetensors, pytorch_model.bin or *.index.json; files there: {sorted(p.name for p in d.iterdir()) if d.is_dir() else 'not a directory'}"
    )


def load_moduleformer(path: PathLike, *, dtype: torch.dtype = torch.float32) -> MoLM:
    """Load a Hugging Face ModuleFormer directory into a molm_ds `MoLM` (CPU, eval mode)."""
    d = Path(path)
    cfg = config_from_hf(json.loads((d / "config.json").read_text()))
    hf_sd = {k: v for k, v in read_hf_state_dict(d).items() if not _DROPPED.search(k)}
    mapping = key_map(cfg)
    missing = sorted(set(mapping) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(mapping))
    if missing or unexpected:
        raise ValueError(f"{d}: checkpoint does not match its config.json: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    with torch.device("meta"):
        model = MoLM(cfg)
    sd = {mapping[k]: v.to(dtype) for k, v in hf_sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    log.info("loaded ModuleFormer checkpoint %s (%d layers, %.1fM parameters)", d, cfg.n_layer, cfg.total_params / 1e6)
    return model.eval()


def save_moduleformer(model: MoLM, path: PathLike) -> None:
    """Write `config.json` and `model.safetensors` in the released layout."""
    from molm_ds.paths import save_safetensors

    cfg = model.config
    hf_cfg = config_to_hf(cfg)
    sd = model.state_dict()
    inverse = {ours: hf for hf, ours in key_map(cfg).items()}
    extra = sorted(set(sd) - set(inverse))
    if extra:
        raise ValueError(f"save_moduleformer: parameters with no released equivalent: {extra[:8]}")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_safetensors({inverse[k]: v.detach().contiguous().cpu() for k, v in sd.items()}, str(d / "model.safetensors"),
                     metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
