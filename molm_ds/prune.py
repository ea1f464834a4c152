"""Pruning unused experts (ModuleFormer §6): measure how often each expert is chosen on task data,
normalise per sub-layer by the most used expert, drop the experts below a threshold tau.

Legend: T tokens, E experts of one sub-layer, K experts per token, R router width, L layers.

    sums  = expert_load_sums(model, batches, group=None)   # {SubLayer: LoadSums}, all-reduced over ranks
    keep  = experts_to_keep(sums, tau=0.1)                  # {SubLayer: kept expert ids}
    small = prune_model(model, keep)                        # new MoLM, per-layer expert counts

Statistics are the monitor's own: an `ExpertLoadTracker` (molm_ds.monitor) adds every MoE sub-layer's
`last_routing` into additive `LoadSums` after each forward and reduces them with one SUM all-reduce,
so N ranks that each see 1/N of the data get exactly the single-process counts. The activation
frequency of expert m is f_m = counts_E[m] / tokens (routed slots over real tokens; sums to k over
the experts of a dropless sub-layer); a sub-layer keeps the experts with f_m / max_m' f_m' >= tau.
tau = 0 keeps every expert (and the logits bit for bit); the most used expert always stays.

A second criterion, router-weighted expert activation (REAP, arXiv 2510.13999): expert m's score is
S_m = mean over the tokens routed to m of g_m(x) * ||f_m(x)||_2 (its gate times the norm of its output,
before the gate), `reap_scores`. Either score keeps a given number of experts per sub-layer
(`experts_to_keep_count`), so two models can be pruned to exactly the same per-layer expert counts.

Removing expert j deletes its stacked weights (row j of every `experts` parameter) and its router row
(row j of `router.w_gate`, the module embedding); B, b stay. The router's softmax then runs over the
kept experts only, k stays (capped at the experts left). The pruned model records its counts in
`ModelConfig.{att,mlp}_experts_per_layer`, so checkpoints (job.yaml model overrides), the trainer
(`init_from`), evaluation and the Hugging Face export (`n_{att,mlp}_experts_per_layer`) rebuild it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molm_ds.config import ModelConfig
from molm_ds.log import get_logger
from molm_ds.model import MoLM
from molm_ds.model.sublayers import ATTN, MLP, SubLayer
from molm_ds.monitor import ExpertLoadTracker, LoadSums

__all__ = [
    "expert_load_sums", "activation_frequencies", "normalized_frequencies", "experts_to_keep", "pruned_config",
    "prune_model", "prune_model_reference_layer", "perplexity", "save_pruned_checkpoint", "param_count",
    "reap_scores", "experts_to_keep_count", "keep_counts_of",
]

log = get_logger("prune")


# ---- statistics ----------------------------------------------------------------------------------
@torch.no_grad()
def expert_load_sums(model: nn.Module, batches: Iterable, *, group=None) -> dict[SubLayer, LoadSums]:
    """Route `batches` (LongTensor [B, T] input ids, or dicts with "input_ids" and optionally
    "attention_mask") through `model` in eval mode (inference routing: plain top-k, dropless) and return
    the per-sub-layer `LoadSums`, SUM-all-reduced over `group` (default world; a no-op without a process
    group). Every rank must call it (collective), even one that has no batches."""
    tracker = ExpertLoadTracker(model, hooks=False)
    try:
        for _ in _routed(model, batches):
            tracker.observe()  # all sub-layers: their last_routing is this forward's
        return tracker.reduce(group=group)
    finally:
        tracker.close()


def _routed(model: nn.Module, batches: Iterable) -> Iterator[None]:
    """Route each batch (LongTensor [B, T], or a dict with "input_ids" and optionally "attention_mask")
    through ``model`` in eval mode, yielding after each forward (the sub-layers' ``last_routing`` is then
    that batch's); the model's training mode is restored at the end."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            ids, mask = (b["input_ids"], b.get("attention_mask")) if isinstance(b, dict) else (b, None)
            model(ids.to(device), attention_mask=None if mask is None else mask.to(device))
            yield
    finally:
        model.train(was_training)


def activation_frequencies(sums: dict[SubLayer, LoadSums]) -> dict[SubLayer, Tensor]:
    """f_m = routed slots of expert m / real tokens, per sub-layer (float64 [E])."""
    out = {}
    for key, s in sums.items():
        tokens = float(s.tokens)
        if tokens <= 0:
            raise ValueError(f"{key.tag}: no tokens were routed; give the pruning more data (--batches)")
        out[key] = s.counts_E.double().cpu() / tokens
    return out


def normalized_frequencies(sums: dict[SubLayer, LoadSums]) -> dict[SubLayer, Tensor]:
    """f_m / max_m' f_m' per sub-layer, in [0, 1]; the most used expert has 1."""
    out = {}
    for key, f in activation_frequencies(sums).items():
        top = float(f.max())
        if top <= 0:
            raise ValueError(f"{key.tag}: every slot was dropped; no expert is used, nothing to normalise by")
        out[key] = f / top
    return out


def experts_to_keep(sums: dict[SubLayer, LoadSums], *, tau: float) -> dict[SubLayer, list[int]]:
    """Expert ids (ascending) whose normalised frequency is >= tau, per sub-layer."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau} must be in [0, 1] (a fraction of the most used expert's frequency)")
    return {k: [int(i) for i in torch.nonzero(nf >= tau).flatten()] for k, nf in normalized_frequencies(sums).items()}


def _gates_TE(layer: nn.Module, probs_TE: Tensor, idx_TK: Tensor) -> Tensor:
    """g_m(x) of every routed (token, expert), 0 elsewhere: the full-softmax probability, renormalised over
    the top-k when the router does that (what the layer's output is weighted with)."""
    E = probs_TE.shape[-1]
    routed_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
    valid = idx_TK >= 0
    routed_TE.scatter_(1, idx_TK.clamp(min=0), valid)
    g_TE = torch.where(routed_TE, probs_TE, torch.zeros_like(probs_TE))
    if getattr(layer.router, "renormalize_topk", False):
        g_TE = g_TE / g_TE.sum(-1, keepdim=True).clamp(min=1e-20)
    return g_TE[:, :E]


def _expert_outputs_TED(layer: nn.Module, x_BTD: Tensor, kind: str) -> Tensor:
    """f_m(x_t) for every token and every expert of one sub-layer, before the gate ([T, E, D]); slow and
    plain: each expert applied to all tokens with its own weights (no dispatch)."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    ex = layer.experts
    outs = []
    for e in range(layer.num_experts):
        if kind == MLP:
            outs.append(ex.act(x_TD @ ex.w1[e]) @ ex.w2[e])
            continue
        from molm_ds.ops import stickbreaking_attention

        k_BTX, v_BTX = layer.shared_kv(x_BTD)
        h, d = layer.n_head, layer.head_dim
        q = (x_TD @ ex.w_q[e]).view(B, T, h, d).transpose(1, 2)  # one query per token: K = 1
        o = stickbreaking_attention(q, k_BTX.view(B, T, h, d).transpose(1, 2), v_BTX.view(B, T, h, d).transpose(1, 2),
                                    include_current=layer.include_current, key_padding_mask=None)
        outs.append(o.transpose(1, 2).reshape(B * T, h * d) @ ex.w_o[e])
    return torch.stack(outs, dim=1)


@torch.no_grad()
def reap_scores(model: nn.Module, batches: Iterable) -> dict[SubLayer, Tensor]:
    """REAP score per expert (float64 [E] per sub-layer): mean over the real tokens routed to expert m of
    g_m(x) * ||f_m(x)||_2, routing `batches` in eval mode (one process; 0 for an expert nobody chose)."""
    subs = {s.key: s.module for s in model.moe_sublayers()}
    inputs: dict[SubLayer, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: inputs.__setitem__(key, args[0].detach()))
             for key, m in subs.items()]
    total = {k: torch.zeros(m.num_experts, dtype=torch.float64) for k, m in subs.items()}
    n = {k: torch.zeros(m.num_experts, dtype=torch.float64) for k, m in subs.items()}
    try:
        for _ in _routed(model, batches):
            for key, m in subs.items():
                rec = m.last_routing
                g_TE = _gates_TE(m, rec.probs_TE.float(), rec.idx_TK)
                if rec.mask_T is not None:
                    g_TE = g_TE * rec.mask_T[:, None].to(g_TE.dtype)
                norm_TE = _expert_outputs_TED(m, inputs[key], key.kind).float().norm(dim=-1)
                routed = g_TE > 0
                total[key] += (g_TE * norm_TE).sum(0).double().cpu()
                n[key] += routed.sum(0).double().cpu()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.where(n[k] > 0, total[k] / n[k].clamp(min=1), torch.zeros_like(total[k])) for k in subs}


def experts_to_keep_count(scores: dict[SubLayer, Tensor], counts: dict[SubLayer, int]) -> dict[SubLayer, list[int]]:
    """The `counts[key]` experts with the highest score per sub-layer (ties to the lower id), ids ascending."""
    out = {}
    for key, sc in scores.items():
        c = counts.get(key, sc.numel())
        if not 1 <= c <= sc.numel():
            raise ValueError(f"{key.tag}: keep {c} experts of {sc.numel()}; give a count in [1, {sc.numel()}]")
        order = sorted(range(sc.numel()), key=lambda e: (-float(sc[e]), e))
        out[key] = sorted(order[:c])
    return out


def keep_counts_of(config: ModelConfig) -> dict[SubLayer, int]:
    """Per-sub-layer expert counts of a (pruned) model's config, for `experts_to_keep_count`."""
    return {**{SubLayer(i, ATTN): config.att_experts_at(i) for i in range(config.n_layer)},
            **{SubLayer(i, MLP): config.mlp_experts_at(i) for i in range(config.n_layer)}}


# ---- surgery -------------------------------------------------------------------------------------
def pruned_config(config: ModelConfig, keep: dict[SubLayer, list[int]]) -> ModelConfig:
    """`config` with per-layer expert counts from `keep` (layers/kinds not in keep keep their count)."""
    att = [len(keep[SubLayer(i, ATTN)]) if SubLayer(i, ATTN) in keep else config.att_experts_at(i)
           for i in range(config.n_layer)]
    mlp = [len(keep[SubLayer(i, MLP)]) if SubLayer(i, MLP) in keep else config.mlp_experts_at(i)
           for i in range(config.n_layer)]
    return ModelConfig(**{**config.model_dump(), "att_experts_per_layer": tuple(att), "mlp_experts_per_layer": tuple(mlp)})


def _check_keep(model: MoLM, keep: dict[SubLayer, list[int]]) -> None:
    if getattr(model, "_molm_expert_parallel", None) is not None:
        raise ValueError("prune_model needs the plain (full) model, not an expert-parallel one: load the checkpoint "
                         "with molm_ds.checkpoint.load_model (all experts on one process)")
    subs = {s.key: s for s in model.moe_sublayers()}
    for key, ids in keep.items():
        if key not in subs:
            raise ValueError(f"keep: no MoE sub-layer {key} in a model of {len(model.blocks)} layers")
        E = subs[key].module.num_experts
        if not ids:
            raise ValueError(f"{key.tag}: keep at least one expert (tau <= 1 always keeps the most used one)")
        if sorted(set(ids)) != list(ids) or ids[0] < 0 or ids[-1] >= E:
            raise ValueError(f"{key.tag}: kept ids {ids} must be distinct, ascending and in [0, {E})")


@torch.no_grad()
def prune_model(model: MoLM, keep: dict[SubLayer, list[int]]) -> MoLM:
    """A new MoLM holding only the kept experts of each sub-layer (their weights and router rows);
    everything else is copied. `model` is not changed. Train/eval mode follows `model`."""
    _check_keep(model, keep)
    cfg = pruned_config(model.config, keep)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = {s.key: s.name for s in model.moe_sublayers()}
    for key, ids in keep.items():
        prefix = names[key] + "."
        idx = torch.tensor(ids, dtype=torch.long)
        for name in list(sd):
            if name.startswith(prefix + "experts.") or name in (prefix + "router.w_gate", prefix + "router.expert_bias_E"):
                sd[name] = sd[name].index_select(0, idx.to(sd[name].device))
    with torch.device("meta"):
        pruned = MoLM(cfg)
    pruned.load_state_dict(sd, strict=True, assign=True)
    before, after = param_count(model), param_count(pruned)
    log.info("pruned %d -> %d parameters (%.1f%%); experts per layer attn %s, mlp %s", before, after,
             100.0 * after / before, list(cfg.att_experts_per_layer), list(cfg.mlp_experts_per_layer))
    return pruned.train(model.training)


def prune_model_reference_layer(layer: nn.Module, ids: list[int], x_TD: Tensor) -> Tensor:
    """Slow path for an MoE MLP sub-layer with only experts `ids` left, from the UNPRUNED layer's
    weights: softmax over the kept rows of A, top-k (k capped), y = sum_k p(m|x) f_m(x), one token at a
    time. What `prune_model` must compute."""
    r = layer.router
    h = x_TD if r.proj is None else F.gelu(r.proj(x_TD))
    logits_TE = h @ r.w_gate[ids].t()
    probs_TE = torch.softmax(logits_TE.float(), -1)
    k = min(r.top_k, len(ids))
    out = []
    for t in range(x_TD.shape[0]):
        p, j = probs_TE[t].topk(k)
        if r.renormalize_topk:
            p = p / p.sum()
        y = torch.zeros_like(x_TD[t])
        for pk, jk in zip(p, j):
            e = ids[int(jk)]
            y = y + pk * (layer.experts.act(x_TD[t] @ layer.experts.w1[e]) @ layer.experts.w2[e])
        out.append(y)
    return torch.stack(out)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- evaluation and checkpoints ---------------------------------------------------------------------
def perplexity(model: nn.Module, batches: Iterable[dict], *, group=None) -> float:
    """exp(mean next-token cross-entropy) over `batches` ({"input_ids", "labels"} [B, T]), token-weighted
    over all ranks of `group` (collective): the trainer's own `molm_ds.train.evaluate`."""
    from molm_ds.train.evaluate import evaluate

    return evaluate(model, batches, group=group).ppl


def save_pruned_checkpoint(model: MoLM, job: dict, out_dir: str, *, tag: str, info: Optional[dict] = None) -> str:
    """Write the pruned model as a weights-only checkpoint `out_dir/<tag>/` in the trainer's layout, with
    `prune.yaml` (`info`) beside; its job.yaml's model section holds the per-layer counts, so
    `molm_ds.checkpoint.load_model` and `init_from` rebuild the pruned model. Returns the tag directory."""
    from molm_ds import checkpoint as ckpt

    return ckpt.write_model(model, job, out_dir, tag=tag, kind="pruned", extra_files={"prune.yaml": info or {}})
